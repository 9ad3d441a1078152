# Sourced by the other scripts: a virtualenv of Debian's python3 in .venv with
# kvmhook installed from this tree (editable), plus the extras named in $1.
# Debian's interpreter on purpose: it is the one the packages run on.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv

need_debs() {
    local missing=()
    for deb in "$@"; do
        dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "ok installed" || missing+=("$deb")
    done
    if ((${#missing[@]})); then
        echo "installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# pip, less this machine's warnings about missing local index paths; pip's own
# failure still fails the script.
quiet_pip() {
    "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
}

# libvirt-python builds from source against libvirt-dev.
need_debs python3 python3-venv python3-dev gcc pkg-config libvirt-dev
[ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
# compat mode: a plain .pth entry, so importing kvmhook costs what it costs installed.
quiet_pip "$VENV/bin/pip" install -q --disable-pip-version-check \
    --config-settings editable_mode=compat -e "$REPO${1:+[$1]}"
