#!/bin/sh
# `make sysdeps`: the optional Debian packages -- chromium (the book's browser test),
# dataset-fashion-mnist (the real Fashion-MNIST: its loader test and the demo's optional secret)
# and the wallpaper photographs of the natural-patches pool ($WALLPAPER_PKGS, from the Makefile).
# What is missing is installed when we are root with apt-get. If something is still missing:
#   CI=true (or 1, yes): an error, exit 1 -- CI must not run without them (the tests that need
#            them would fail, not skip: tests/strict_ci.py);
#   otherwise: a warning, exit 0 -- the tests that need them are skipped.
# Where they are looked for: STEALNB_CHROMIUM (a path or command name, as stealnb.report.bookcheck uses
# it; apt-get cannot provide a custom path, so it is only checked) and FASHION_DIR (default
# /usr/share/datasets/fashion-mnist, the Debian package's folder).
set -u
FASHION_DIR=${FASHION_DIR:-/usr/share/datasets/fashion-mnist}
case "$(printf %s "${CI:-}" | tr '[:upper:]' '[:lower:]')" in true|1|yes) ci=1 ;; *) ci= ;; esac

have_chromium() {
  if [ -n "${STEALNB_CHROMIUM:-}" ]; then
    case $STEALNB_CHROMIUM in
      */*) [ -f "$STEALNB_CHROMIUM" ] && [ -x "$STEALNB_CHROMIUM" ] ;;
      *) command -v "$STEALNB_CHROMIUM" >/dev/null 2>&1 ;;
    esac
    return
  fi
  for c in chromium chromium-browser google-chrome; do
    command -v "$c" >/dev/null 2>&1 && return 0
  done
  return 1
}

missing() {
  m=""
  have_chromium || m="chromium"
  [ -d "$FASHION_DIR" ] || m="${m:+$m }dataset-fashion-mnist"
  for p in ${WALLPAPER_PKGS-lomiri-wallpapers-16.04 mate-backgrounds}; do
    dpkg -s "$p" >/dev/null 2>&1 || m="${m:+$m }$p"
  done
  printf %s "$m"
}

need=$(missing)
[ -z "$need" ] && exit 0

note=""
installable=$need
if [ -n "${STEALNB_CHROMIUM:-}" ] && ! have_chromium; then
  note=" (STEALNB_CHROMIUM=$STEALNB_CHROMIUM is not an executable)"
  installable=$(printf %s "$need" | sed 's/chromium *//')
fi
why=""
if [ -z "$installable" ]; then
  why="apt-get cannot fix that; point STEALNB_CHROMIUM at a Chromium or unset it"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log=$(mktemp)
  # shellcheck disable=SC2086  # the package names are words
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $installable) >"$log" 2>&1
  rc=$?
  if [ "$rc" -ne 0 ]; then
    why="apt-get install $installable failed (exit $rc): $(tail -n 3 "$log" | tr '\n' ' ')"
  fi
  rm -f "$log"
  need=$(missing)
  [ -z "$need" ] && exit 0
  [ -n "$why" ] || why="still missing after apt-get install $installable"
else
  why="not root or no apt-get, so nothing was installed; run: sudo apt-get install $installable"
fi

if [ -n "$ci" ]; then
  echo "sysdeps: ERROR: missing $need$note -- $why." >&2
  echo "sysdeps: CI=true needs them: without them the browser, Fashion-MNIST and wallpaper-pool tests fail." >&2
  exit 1
fi
echo "sysdeps: warning: missing $need$note -- $why; the tests that need them will be skipped." >&2
exit 0
