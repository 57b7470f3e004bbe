#!/bin/sh
# The Debian tools the tests drive (`make test-deps`): Prometheus and a headless Chromium (the
# metrics tests), nginx (the deployment gateway tests), dicom3tools' dciodvfy (the DICOM that
# `medfed predict` writes is validated with it).
#
# As root it installs only what is missing, without recommends, with a temporary policy-rc.d
# that exits 101 so that no package's postinst starts a service, and disables again the units
# the new packages enabled; the policy file is removed (a previous one restored) afterwards,
# on failure too. It ends by naming every package it installed. Not root: it says what to run.
set -eu
TOOLS="${MEDFED_TEST_TOOLS:-/usr/bin/prometheus:prometheus /usr/bin/chromium:chromium /usr/sbin/nginx:nginx-light /usr/bin/dciodvfy:dicom3tools}"
POLICY="${MEDFED_POLICY_RC:-/usr/sbin/policy-rc.d}"

missing=""
for tool in $TOOLS; do
	[ -x "${tool%%:*}" ] || missing="$missing ${tool#*:}"
done
[ -n "$missing" ] || exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
	echo "the tests need$missing: run 'sudo make test-deps'" \
		"(it runs 'apt-get install --no-install-recommends$missing' and starts no service);" \
		"without them those tests skip locally and fail in CI" >&2
	exit 0
fi

saved=""
restore() {
	rm -f "$POLICY"
	if [ -n "$saved" ]; then mv "$saved" "$POLICY"; fi
}
if [ -e "$POLICY" ]; then
	saved="$POLICY.medfed-saved"
	mv "$POLICY" "$saved"
fi
trap restore EXIT
trap 'exit 1' INT TERM
printf '#!/bin/sh\n# written by medfed `make test-deps`: no service starts while it installs\nexit 101\n' \
	>"$POLICY"
chmod 755 "$POLICY"

before=$(dpkg-query -W -f '${Package}\n')
echo "installing$missing for the tests (Debian packages, no recommends, no service started)"
apt-get update -q
# shellcheck disable=SC2086 # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
installed=$(dpkg-query -W -f '${Package}\n' | grep -vxF -e "$before" || true)
for package in $installed; do
	for unit in $(dpkg -L "$package" | grep -E '/systemd/system/[^/]+\.(service|socket|timer)$' || true); do
		deb-systemd-helper disable "${unit##*/}" >/dev/null 2>&1 || true
	done
done
echo "installed for the tests:" $installed
