#!/usr/bin/env bash
# `make run`: gunicorn in the foreground, a Celery worker (with beat) beside it on the
# filesystem broker; stopping one stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p var/celery
"$BIN/celery" -A workers.app worker --beat --pool solo --loglevel warning \
  --schedule var/celery/beat-schedule >var/celery/worker.log 2>&1 &
worker=$!
trap 'kill "$worker" 2>/dev/null || true' EXIT INT TERM
echo "Celery worker (pid $worker) logs to var/celery/worker.log"
"$BIN/gunicorn" registry.wsgi:application -c deploy/gunicorn.conf.py --bind "${HOST:-127.0.0.1}:${PORT:-8000}"
