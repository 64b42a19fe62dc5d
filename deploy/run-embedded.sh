#!/usr/bin/env bash
# `make run`: gunicorn in the foreground, a Celery worker (with beat) beside it on the
# filesystem broker; stopping one stops both. `manage.py demo_setup` has already written
# var/ (the secret key both read, the broker folders, the database).
set -euo pipefail
cd "$(dirname "$0")/.."
# Objects, keys, the database's journal and the logs are for this user only.
umask 077
BIN=.venv/bin
VAR="${SMR_VAR_DIR:-var}"
mkdir -p "$VAR/celery"
# One worker consumes every queue here: `celery` (periodic housekeeping), `scan`, `webhooks`
# and `dp` (DP training, which holds this one worker until it ends). `make run` installs no
# torch: a dp job then fails with a message naming the extra to install (pip install -e '.[dp]').
"$BIN/celery" -A workers.app worker --beat --pool solo --loglevel warning -Q celery,scan,webhooks,dp \
  --schedule "$VAR/celery/beat-schedule" >"$VAR/celery/worker.log" 2>&1 &
worker=$!
echo "Celery worker (pid $worker) logs to $VAR/celery/worker.log"
"$BIN/gunicorn" registry.wsgi:application -c deploy/gunicorn.conf.py \
  --bind "${HOST:-127.0.0.1}:${PORT:-8000}" &
web=$!
# Waiting on gunicorn in the background (not running it in the foreground) lets a TERM sent to
# this script run the trap at once, so stopping either stops both.
trap 'kill "$worker" "$web" 2>/dev/null || true' EXIT INT TERM
wait "$web"
