"""keystore: the command lines of keystore-setup and keystore-cert-import.

Their work is kvmhook.certs.keysetup's and kvmhook.certs.certimport's:
keystore depends on kvmhook, never the reverse.
"""
