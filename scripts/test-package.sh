#!/bin/sh
# Builds the Debian package in a temporary copy of the tree, installs it on
# this machine's apache2 and checks it: a2enmod msoauth (with dbd), apache2ctl
# configtest with the shipped sample, the installed files; then purges it and
# puts /etc/apache2 and /var/lib/apache2 back as they were.
# Debian 12, as root; never starts the system apache2.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
pkg=libapache2-mod-msoauth
t0=$(date +%s)
step="start" tstep=$t0

step() {
  now=$(date +%s)
  [ "$step" = start ] || echo "    ($step: $((now - tstep)) s)"
  step=$1 tstep=$now
  echo "=== package: $step"
}
fail() { echo "test-package: $step: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (it installs and purges a package)"

step "dependencies (scripts/install-deps.sh package)"
sh scripts/install-deps.sh package

step "preconditions"
# Never touch an administrator's installation.
if dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qv '^not-installed$'; then
  fail "$pkg is installed on this machine already; not touching it"
fi
for f in /etc/apache2/mods-available/msoauth.load /etc/apache2/mods-available/msoauth.conf \
         /etc/apache2/mods-enabled/msoauth.load /usr/lib/apache2/modules/mod_msoauth.so; do
  [ ! -e "$f" ] && [ ! -L "$f" ] || fail "$f exists (installed by hand?); not touching it"
done
[ ! -e /var/run/apache2/apache2.pid ] || fail "the system apache2 is running; not touching it"
ac_version=$(sed -n 's/^AC_INIT(\[mod_msoauth\], *\[\([^]]*\)\].*/\1/p' configure.ac)
deb_version=$(dpkg-parsechangelog -l debian/changelog -S Version)
[ "${deb_version%-*}" = "$ac_version" ] ||
  fail "debian/changelog ($deb_version) does not match configure.ac ($ac_version): dch -v $ac_version-1"

work=$(mktemp -d /tmp/msoauth-package.XXXXXX)
chmod 755 "$work"          # apt's _apt user reads the .deb from here
state() { find /etc/apache2 /var/lib/apache2 -printf '%p %y %m %u:%g\n' 2>/dev/null | sort; }
state > "$work/state.before"
dbd_was_enabled=no
a2query -q -m dbd 2>/dev/null && dbd_was_enabled=yes
keys_existed=no
for f in msoauth.key msoauth-secret.txt msoauth-api.key; do
  [ ! -e "/etc/apache2/$f" ] || keys_existed=yes
done
created=""                 # files this script made in /etc/apache2
own_policy=no

cleanup() {
  rc=$?
  trap - EXIT INT TERM
  set +e
  [ "$rc" -eq 0 ] || echo "test-package: FAILED in step: $step" >&2
  echo "=== package: cleanup"
  # Disabled by hand first, so the prerm has no reason to restart httpd.
  a2query -q -m msoauth 2>/dev/null && a2dismod -q msoauth >/dev/null
  if dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qv '^not-installed$'; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "$pkg" >"$work/purge.log" 2>&1 ||
      { cat "$work/purge.log" >&2; rc=1; }
  fi
  if [ "$dbd_was_enabled" = no ] && a2query -q -m dbd 2>/dev/null; then
    a2dismod -q -p dbd >/dev/null
  fi
  for f in $created; do rm -f "$f"; done
  # a2enmod/a2dismod leave empty marker directories behind: remove those that
  # did not exist before.
  state > "$work/state.after"
  awk '{print $1}' "$work/state.before" > "$work/paths.before"
  awk '$2 == "d" {print $1}' "$work/state.after" | sort -r | while read -r d; do
    grep -qxF "$d" "$work/paths.before" || rmdir "$d" 2>/dev/null
  done
  state > "$work/state.after"
  if ! cmp -s "$work/state.before" "$work/state.after"; then
    echo "test-package: /etc/apache2 or /var/lib/apache2 differ from before the test:" >&2
    diff "$work/state.before" "$work/state.after" >&2
    rc=1
  fi
  [ "$own_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
  rm -rf "$work"
  echo "=== package: $( [ "$rc" -eq 0 ] && echo passed || echo FAILED ) in $(( $(date +%s) - t0 )) s"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "copy of the tree"
mkdir "$work/src"
src="$work/src/$pkg-$ac_version"
mkdir "$src"
if git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
  git_before=$(git -C "$top" status --porcelain --untracked-files=all)
  # Tracked and new files, not what .gitignore names (build directories, autotools output).
  git -C "$top" ls-files -z -c -o --exclude-standard |
    (cd "$top" && tar --null --ignore-failed-read -T - -cf -) | tar -x -C "$src"
else
  tar -C "$top" --exclude='./build*' --exclude=./run --exclude=./autom4te.cache -cf - . |
    tar -x -C "$src"
fi
[ -f "$src/debian/control" ] || fail "no debian/ in the copy"

step "build (dpkg-buildpackage -us -uc -b)"
if ! (cd "$src" && DEB_BUILD_OPTIONS="nocheck parallel=$(nproc)" \
        dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1); then
  tail -n 40 "$work/build.log" >&2
  fail "dpkg-buildpackage failed (last lines of its log above)"
fi
deb=$(ls "$work/src/${pkg}_"*.deb)
[ -n "$deb" ] && [ -f "$deb" ] || fail "no ${pkg}_*.deb built"
if [ -n "${git_before+x}" ]; then
  [ "$(git -C "$top" status --porcelain --untracked-files=all)" = "$git_before" ] ||
    fail "the build changed the repository (it must only touch the copy)"
fi
echo "    $(basename "$deb")"

step "lintian"
# Every tag is shown; only errors fail (a warning such as a program without a
# manual page must not break the build of the day it arrives).
lrc=0
lintian --fail-on error --display-info --display-experimental --pedantic \
  "$work/src/${pkg}_"*.changes > "$work/lintian.log" 2>&1 || lrc=$?
grep -v 'running with root privileges' "$work/lintian.log" || echo "    no tags (overrides: debian/$pkg.lintian-overrides)"
[ "$lrc" -eq 0 ] || fail "lintian found errors (above)"

step "contents of the .deb"
dpkg-deb -c "$deb" | awk '{print $6}' > "$work/files"
for f in ./usr/lib/apache2/modules/mod_msoauth.so \
         ./etc/apache2/mods-available/msoauth.load ./etc/apache2/mods-available/msoauth.conf \
         ./usr/share/doc/$pkg/copyright ./usr/share/doc/$pkg/changelog.gz \
         ./usr/share/doc/$pkg/README.md.gz \
         ./usr/bin/msoauthctl ./usr/share/man/man1/msoauthctl.1.gz; do
  grep -qx "$f" "$work/files" || fail "$f is not in the package"
done
! grep -q '\.la$' "$work/files" || fail "a libtool .la is in the package"
mkdir "$work/ctl"
dpkg-deb -e "$deb" "$work/ctl"
for f in /etc/apache2/mods-available/msoauth.load /etc/apache2/mods-available/msoauth.conf; do
  grep -qx "$f" "$work/ctl/conffiles" || fail "$f is not a conffile"
  dpkg-deb --fsys-tarfile "$deb" | tar -xO ".$f" | cmp -s - "conf/$(basename "$f")" ||
    fail "$f in the package differs from conf/$(basename "$f")"
done
grep -Eq '^# Depends:.* dbd( |$)' conf/msoauth.load || fail "conf/msoauth.load lacks '# Depends: dbd'"
! grep -q 'a2enmod\|apache2_invoke enmod' "$work/ctl/postinst" ||
  fail "the postinst enables something"

step "install (apt-get install ./$(basename "$deb"))"
if [ ! -e /usr/sbin/policy-rc.d ]; then     # no daemon (re)starts from maintainer scripts
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  own_policy=yes
fi
(cd "$work/src" && DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -q --no-install-recommends "./$(basename "$deb")") >"$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "apt-get install failed"; }
[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg")" = installed ] || fail "$pkg is not installed"
! a2query -q -m msoauth 2>/dev/null || fail "installing the package enabled msoauth"
[ ! -e /var/run/apache2/apache2.pid ] || fail "installing the package started apache2"
d=/var/lib/apache2/msoauth
[ "$(stat -c '%U:%G %a' "$d" 2>/dev/null)" = "www-data:www-data 750" ] ||
  fail "$d is not www-data:www-data 750: $(stat -c '%U:%G %a' "$d" 2>&1)"

step "a2enmod msoauth"
a2enmod msoauth > "$work/a2enmod.log" 2>&1 || { cat "$work/a2enmod.log" >&2; fail "a2enmod msoauth failed"; }
cat "$work/a2enmod.log"
a2query -q -m msoauth || fail "msoauth is not enabled"
a2query -q -m dbd || fail "dbd was not enabled with msoauth (# Depends: dbd)"
if [ -e /etc/apache2/mods-available/watchdog.load ]; then
  a2query -q -m watchdog || fail "watchdog is a loadable module here but not enabled"
else
  apache2ctl -l 2>/dev/null | grep -q 'mod_watchdog\.c' ||
    fail "mod_watchdog is neither compiled into httpd nor a loadable module"
fi

step "apache2ctl configtest without the key files (must fail)"
if [ "$keys_existed" = no ]; then
  if apache2ctl configtest > "$work/configtest.log" 2>&1; then
    cat "$work/configtest.log" >&2; fail "configtest passed without the key and secret files"
  fi
  grep -q 'MSOAuthTokenKeyFile' "$work/configtest.log" ||
    { cat "$work/configtest.log" >&2; fail "configtest did not name MSOAuthTokenKeyFile"; }
  echo "    fails as it should: $(grep -m1 'MSOAuthTokenKeyFile' "$work/configtest.log" | cut -c1-160)"
else
  echo "    skipped: key files of this machine's administrator exist"
fi

step "apache2ctl configtest with the key, secret and API key"
secret="test-package-secret~$(openssl rand -hex 8)"
for f in msoauth.key msoauth-secret.txt msoauth-api.key; do
  p=/etc/apache2/$f
  [ -e "$p" ] && continue
  created="$created $p"
  if [ "$f" = msoauth-secret.txt ]; then printf '%s\n' "$secret" > "$p"; else openssl rand -hex 32 > "$p"; fi
  chmod 600 "$p"
done
apache2ctl configtest > "$work/configtest.log" 2>&1 || { cat "$work/configtest.log" >&2; fail "configtest failed"; }
cat "$work/configtest.log"
grep -q '^Syntax OK$' "$work/configtest.log" || fail "no 'Syntax OK'"
! grep -qF "$secret" "$work/configtest.log" || fail "configtest printed the client secret"
apache2ctl -M 2>/dev/null > "$work/modules"
grep -q 'msoauth_module (shared)' "$work/modules" || fail "msoauth_module is not loaded"
grep -q 'dbd_module (shared)' "$work/modules" || fail "dbd_module is not loaded"
[ ! -e /var/run/apache2/apache2.pid ] || fail "apache2 was started"

step "installed files"
dpkg -L "$pkg" | sort > "$work/installed"
so=/usr/lib/apache2/modules/mod_msoauth.so
grep -qx "$so" "$work/installed" || fail "$so is not in dpkg -L"
exports=$(nm -D --defined-only "$so" | awk '{print $3}')
[ "$exports" = msoauth_module ] || fail "$so exports more than msoauth_module: $exports"
for b in $(grep -E '^/usr/s?bin/.' "$work/installed" || true); do
  [ -x "$b" ] || fail "$b is not executable"
  echo "    program: $b"
done
/usr/bin/msoauthctl --version | grep -q "^msoauthctl (mod_msoauth) $ac_version\$" ||
  fail "msoauthctl --version does not say $ac_version"
/usr/bin/msoauthctl check-key /etc/apache2/msoauth.key | grep -q 'a valid key, key id' ||
  fail "msoauthctl check-key does not read the key configtest used"
man -w msoauthctl >/dev/null 2>&1 || [ -f /usr/share/man/man1/msoauthctl.1.gz ] ||
  fail "no manual page for msoauthctl"
dpkg-query -W -f='${Conffiles}\n' "$pkg" | grep -q ' /etc/apache2/mods-available/msoauth.conf ' ||
  fail "msoauth.conf is not registered as a conffile"

step "purge"
a2dismod -q msoauth >/dev/null || fail "a2dismod msoauth failed"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "$pkg" >"$work/purge.log" 2>&1 ||
  { cat "$work/purge.log" >&2; fail "apt-get purge failed"; }
[ ! -e /etc/apache2/mods-available/msoauth.conf ] || fail "purge left msoauth.conf"
[ ! -e "$so" ] || fail "purge left $so"
[ ! -e /var/lib/apache2/msoauth ] || fail "purge left the empty /var/lib/apache2/msoauth"
step "done"
# cleanup (EXIT) disables dbd again if the test enabled it, removes the files it
# created and checks /etc/apache2 and /var/lib/apache2 are as before.
