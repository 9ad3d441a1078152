"""keystore: the command lines of keystore-setup and keystore-cert-import (their work is
kvmhook.keysetup's and kvmhook.certimport's: keystore depends on kvmhook, never the reverse)."""
