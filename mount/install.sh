#!/bin/sh
# Install the efsish mount(8)/umount(8) helpers (as root):
#   mount/install.sh              symlink /sbin/mount.efsish and /sbin/umount.fuse.efsish
#                                 (and the /usr/sbin ones) to the scripts in this directory,
#                                 create /var/cache/efsish (0700) and an example
#                                 /etc/default/efsish (0600) when missing
#   mount/install.sh --systemd    also copy efsish-home.mount to
#                                 /etc/systemd/system/home.mount (not enabled: edit What=,
#                                 then `systemctl daemon-reload && systemctl enable --now home.mount`)
#   mount/install.sh --uninstall  remove the symlinks (only ours) and the unit if unchanged
# Re-running is harmless.
set -eu

here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
systemd=0 uninstall=0
for a in "$@"; do
    case $a in
        --systemd) systemd=1 ;;
        --uninstall) uninstall=1 ;;
        -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 1; }

# /sbin and /usr/sbin are one directory on merged-/usr systems: handle each real dir once.
dirs=""
for d in /sbin /usr/sbin; do
    [ -d "$d" ] || continue
    real=$(readlink -f "$d")
    case " $dirs " in *" $real "*) ;; *) dirs="$dirs $real" ;; esac
done

link() { # link TARGET LINKNAME
    if [ -e "$2" ] || [ -L "$2" ]; then
        if [ "$(readlink -f "$2")" = "$(readlink -f "$1")" ]; then
            echo "ok       $2 -> $1"
            return
        fi
        if [ ! -L "$2" ]; then
            echo "install.sh: $2 exists and is not a symlink; leaving it alone" >&2
            return
        fi
    fi
    ln -sfn "$1" "$2"
    echo "linked   $2 -> $1"
}
unlink_ours() { # unlink_ours TARGET LINKNAME
    if [ -L "$2" ] && [ "$(readlink -f "$2")" = "$(readlink -f "$1")" ]; then
        rm -f "$2"
        echo "removed  $2"
    fi
}

unit=/etc/systemd/system/home.mount
if [ "$uninstall" = 1 ]; then
    for d in $dirs; do
        unlink_ours "$here/mount.efsish" "$d/mount.efsish"
        unlink_ours "$here/umount.efsish" "$d/umount.fuse.efsish"
    done
    if [ -f "$unit" ] && cmp -s "$unit" "$here/efsish-home.mount"; then
        rm -f "$unit"
        echo "removed  $unit"
    fi
    exit 0
fi

chmod 755 "$here/mount.efsish" "$here/umount.efsish"
for d in $dirs; do
    link "$here/mount.efsish" "$d/mount.efsish"
    link "$here/umount.efsish" "$d/umount.fuse.efsish"
done

if [ ! -d /var/cache/efsish ]; then
    (umask 077 && mkdir -p /var/cache/efsish)
    echo "created  /var/cache/efsish (0700)"
fi
if [ ! -e /etc/default/efsish ]; then
    mkdir -p /etc/default
    (umask 077 && cp "$here/efsish.default" /etc/default/efsish)
    echo "created  /etc/default/efsish (0600): put the endpoint and credentials there"
fi

if [ "$systemd" = 1 ]; then
    if [ -e "$unit" ] && ! cmp -s "$unit" "$here/efsish-home.mount"; then
        echo "install.sh: $unit exists and differs; not overwriting it" >&2
    else
        mkdir -p /etc/systemd/system
        cp "$here/efsish-home.mount" "$unit"
        echo "copied   $unit (edit What=, then: systemctl daemon-reload && systemctl enable --now home.mount)"
    fi
fi

# Tell the operator which efsish the helper will run.
if [ -n "${EFSISH_BIN:-}" ]; then
    bin=$EFSISH_BIN
elif command -v efsish >/dev/null 2>&1; then
    bin=$(command -v efsish)
else
    bin=$(cd "$here/.." && pwd)/.venv/bin/efsish
fi
if [ -x "$bin" ]; then
    echo "mount.efsish will run $bin (override with EFSISH_BIN in /etc/default/efsish)"
else
    echo "warning: no efsish executable found ($bin): run scripts/bootstrap, or set EFSISH_BIN in /etc/default/efsish" >&2
fi
