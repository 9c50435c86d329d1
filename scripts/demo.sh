#!/bin/sh
# Builds mod_msoauth and starts it on 127.0.0.1 with SQLite and the Microsoft
# simulator (or real Microsoft when MSOAUTH_CLIENT_ID and MSOAUTH_CLIENT_SECRET
# are set). Debian 12, as root.    scripts/demo.sh [stop]
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
run="$top/run"
port=${MSOAUTH_PORT:-8080}
simport=${MSOAUTH_SIM_PORT:-8081}
httpd=/usr/sbin/apache2

stop() {
  [ -f "$run/httpd.conf" ] && $httpd -d "$run" -f "$run/httpd.conf" -k stop 2>/dev/null || true
  [ -f "$run/sim.pid" ] && kill "$(cat "$run/sim.pid")" 2>/dev/null || true
  rm -f "$run/sim.pid"
}
if [ "${1:-}" = stop ]; then stop; echo "stopped"; exit 0; fi

sh "$top/scripts/install-deps.sh" build
# Its own build directory: the test command configures build/release differently.
sh "$top/scripts/build.sh" "$top/build/demo" CFLAGS="-O2 -g"
stop
mkdir -p "$run/data" "$run/logs" "$run/htdocs" "$run/runtime"
id www-data >/dev/null 2>&1 && chown www-data:www-data "$run/data"
[ -f "$run/token.key" ] || { openssl rand -hex 32 > "$run/token.key"; chmod 600 "$run/token.key"; }

if [ -n "${MSOAUTH_CLIENT_ID:-}" ] && [ -n "${MSOAUTH_CLIENT_SECRET:-}" ]; then
  printf '%s\n' "$MSOAUTH_CLIENT_SECRET" > "$run/secret.txt"; chmod 600 "$run/secret.txt"
  client_id=$MSOAUTH_CLIENT_ID
  endpoints="MSOAuthTenant ${MSOAUTH_TENANT:-common}"
  where="Microsoft (client $client_id)"
else
  nohup /usr/bin/python3 "$top/t/sim/mssim.py" --port "$simport" --demo \
    > "$run/logs/sim.log" 2>&1 &
  echo $! > "$run/sim.pid"
  i=0; until grep -q "listening" "$run/logs/sim.log" 2>/dev/null; do
    i=$((i+1)); [ $i -gt 100 ] && { cat "$run/logs/sim.log"; exit 1; }; sleep 0.1; done
  client_id=$(sed -n 's/^demo client_id: *//p' "$run/logs/sim.log" | head -n1)
  sed -n 's/^demo client_secret: *//p' "$run/logs/sim.log" | head -n1 > "$run/secret.txt"
  chmod 600 "$run/secret.txt"
  endpoints="MSOAuthAuthorityURL http://127.0.0.1:$simport
MSOAuthGraphURL http://127.0.0.1:$simport"
  where="the Microsoft simulator on http://127.0.0.1:$simport"
fi

mods=/usr/lib/apache2/modules
cat > "$run/httpd.conf" <<CONF
ServerRoot "$run"
ServerName 127.0.0.1:$port
Listen 127.0.0.1:$port
PidFile "$run/runtime/httpd.pid"
DefaultRuntimeDir "$run/runtime"
ErrorLog "$run/logs/error.log"
LogLevel warn msoauth:info
User www-data
Group www-data
LoadModule mpm_event_module $mods/mod_mpm_event.so
LoadModule authz_core_module $mods/mod_authz_core.so
LoadModule authz_host_module $mods/mod_authz_host.so
LoadModule mime_module $mods/mod_mime.so
LoadModule dir_module $mods/mod_dir.so
LoadModule dbd_module $mods/mod_dbd.so
LoadModule msoauth_module $top/build/demo/.libs/mod_msoauth.so
TypesConfig /etc/mime.types
DocumentRoot "$run/htdocs"
DirectoryIndex index.html

DBDriver sqlite3
DBDParams "$run/data/msoauth.db"
MSOAuthTokenKeyFile token.key
MSOAuthClientID $client_id
MSOAuthClientSecretFile secret.txt
MSOAuthEdition pro
$endpoints

<Location /microsoft_outlook/connect>
  SetHandler msoauth-connect
</Location>
<Location /microsoft_outlook/confirm>
  SetHandler msoauth-confirm
</Location>
<Location /microsoft_outlook/token>
  SetHandler msoauth-token
  Require local
</Location>
<Location /microsoft_outlook/admin>
  SetHandler msoauth-admin
  Require local
</Location>
CONF

cat > "$run/htdocs/index.html" <<HTML
<!doctype html><meta charset="utf-8"><title>mod_msoauth demo</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto;line-height:1.5}</style>
<h1>mod_msoauth demo</h1>
<p id="result"></p>
<p><a href="/microsoft_outlook/connect?return_to=/">Connect Outlook</a> ·
<a href="/microsoft_outlook/admin/">Status page</a></p>
<p>httpd runs mod_msoauth with SQLite ($run/data/msoauth.db) against $where.
Connected mailboxes are rows of the table msoauth_accounts; their inbox is mirrored into
msoauth_messages within seconds (newest first), and rows inserted into msoauth_actions
(mark_read, mark_unread, move, delete) are applied to Outlook. Try:
<code>sqlite3 $run/data/msoauth.db "SELECT subject, is_read FROM msoauth_messages
ORDER BY received_at DESC LIMIT 5"</code></p>
<p>Redirect URI to register in Azure: <code>http://127.0.0.1:$port/microsoft_outlook/confirm</code></p>
<script>
var q = new URLSearchParams(location.search);
if (q.get("msoauth")) document.getElementById("result").textContent =
  q.get("msoauth") === "connected" ? "Connected: account " + q.get("account")
                                   : "Not connected: " + q.get("reason");
</script>
HTML

$httpd -d "$run" -f "$run/httpd.conf" -t
$httpd -d "$run" -f "$run/httpd.conf" -k start
echo
echo "mod_msoauth is running: open http://127.0.0.1:$port/"
echo "logs: $run/logs/error.log   stop: sh scripts/demo.sh stop"
