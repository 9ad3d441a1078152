#!/bin/bash
# Install everything the tests need (Debian packages included), then run the
# whole suite: lint, the Python 3.9 floor, and pytest. Debian, as root.
# Under CI=true a test whose prerequisite is missing fails instead of skipping.
set -euo pipefail
source "$(dirname "$0")/venv.sh" test
cd "$REPO"
# tests/e2e: a real libvirtd and QEMU, the tools that build the packages; keytool
# and openssl check the keystore tools; iproute2 makes the bridges, and
# benchmarks/bridge_making.py measures pyroute2 against it; prometheus's promtool
# checks and unit-tests the alert rules (its daemon is not started in a container
# whose policy-rc.d says no).
need_debs libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 \
    make dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-click \
    python3-cryptography python3-cs python3-libvirt python3-psutil python3-requests \
    python3-prometheus-client python3-structlog \
    rpm logrotate default-jre-headless default-jdk-headless openssl systemd iproute2 python3-pyroute2 \
    prometheus prometheus-node-exporter

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# RHEL 9 runs the rpm on its system python3, 3.9: nothing newer may creep in.
"$VENV/bin/vermin" -q -t=3.9- --no-tips --violations --exclude-regex '^\.venv/' kvmhook keystore tests benchmarks

# The oldest libraries the packages meet (RHEL 9: click 7.1, cryptography 36;
# Debian 12 has 8.1 and 38): every test of code that uses them runs on those too.
FLOOR=$REPO/build/venv-floor
[ -x "$FLOOR/bin/python" ] || /usr/bin/python3 -m venv "$FLOOR"
quiet_pip "$FLOOR/bin/pip" install -q --disable-pip-version-check click==7.1.2 \
    cryptography==36.0.1 libvirt-python==9.0.0 cs==2.7.1 requests==2.25.1 psutil \
    prometheus_client==0.9.0 structlog==21.1.0 pytest hypothesis pyfakefs
quiet_pip "$FLOOR/bin/pip" install -q --disable-pip-version-check --no-deps \
    --config-settings editable_mode=compat -e "$REPO"
"$FLOOR/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_cli.py tests/test_cert.py tests/test_rotation.py tests/test_keystore.py tests/test_pki.py tests/test_migrate.py \
    tests/test_tls_setup.py tests/test_controller.py tests/test_capacity.py tests/test_maintenance.py \
    tests/test_exitcodes.py tests/test_cli_ranges.py tests/test_files.py tests/test_keystore_hardening.py \
    tests/test_metrics.py tests/test_rolling.py

status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure, not a pass" >&2
    exit 1
fi
exit "$status"
