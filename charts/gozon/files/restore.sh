#!/bin/sh
# Restores one gozon database from a dump of files/backup.sh (docs/operations.md, "Restoring
# from a backup"). The target is named by libpq's variables (PGHOST, PGPORT, PGUSER,
# PGPASSWORD, PGDATABASE) and must exist; whatever it holds is replaced.
#
#   restore.sh <dump file>
#
# The archive is read through once before anything is changed (a truncated or foreign file is
# refused), then restored in one transaction with --exit-on-error: the database ends either
# wholly restored or as it was. Objects are owned by the connecting user (--no-owner), so a
# dump restores into a fresh server whose role has another name.
set -eu

if [ "$#" -ne 1 ] || [ ! -f "$1" ]; then
  echo "usage: restore.sh <dump file>   (PGHOST, PGUSER, PGPASSWORD, PGDATABASE name the target)" >&2
  exit 2
fi
: "${PGDATABASE:?PGDATABASE names the database to restore into}"

pg_restore --list "$1" > /dev/null
pg_restore --clean --if-exists --no-owner --no-privileges --single-transaction --exit-on-error \
  --no-password --dbname="$PGDATABASE" "$1"
echo "restore: $1 -> $PGDATABASE"
