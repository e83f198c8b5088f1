# Sourced by slurm/local_cluster.sh and benchmarks/gpu.sh, which run as root: one check of a folder before it is
# trusted with configuration, pid files or wheels to install.

# private_dir DIR [create]: DIR as an absolute path (its parents' links resolved), made with mode 0700 when
# missing and asked to. Prints that path, or why DIR cannot be trusted (status 1): it must be a real folder, not a
# link, owned by this user (or the one who ran sudo: they are root already) and writable by no one else, and each
# parent must be owned by one of those or root and writable by no one else unless sticky (/tmp), so that no one
# else can have made it, change what is in it, or rename it away and put their own in its place.
private_dir() {
    local d=$1 create=${2:-} me parent name p owner mode
    me=$(id -u)
    local trusted=" 0 $me ${SUDO_UID:-} "
    while [ "${#d}" -gt 1 ] && [ "${d%/}" != "$d" ]; do d=${d%/}; done
    [ -n "$d" ] || { echo "an empty folder name"; return 1; }
    parent=$(dirname -- "$d"); name=$(basename -- "$d")
    [ -n "$create" ] && mkdir -p -- "$parent" 2>/dev/null
    parent=$(cd -P -- "$parent" 2>/dev/null && pwd) || { echo "$d: its parent folder is missing"; return 1; }
    p=$parent
    while :; do
        read -r owner mode < <(stat -c '%u %a' -- "$p") || { echo "$d: cannot stat $p"; return 1; }
        case $trusted in *" $owner "*) ;; *) echo "$d lies in $p, owned by uid $owner"; return 1 ;; esac
        if (( 8#$mode & 8#022 )) && ! (( 8#$mode & 8#1000 )); then
            echo "$d lies in $p, writable by others (mode $mode)"; return 1
        fi
        [ "$p" = / ] && break
        p=$(dirname -- "$p")
    done
    d=${parent%/}/$name
    [ -n "$create" ] && mkdir -m 700 -- "$d" 2>/dev/null  # fails harmlessly when something is there
    if [ -L "$d" ]; then echo "$d is a symbolic link"; return 1; fi
    [ -e "$d" ] || { echo "$d does not exist"; return 1; }
    [ -d "$d" ] || { echo "$d is not a folder"; return 1; }
    read -r owner mode < <(stat -c '%u %a' -- "$d") || { echo "cannot stat $d"; return 1; }
    case $trusted in *" $owner "*) ;; *) echo "$d is owned by uid $owner, not by this user ($me)"; return 1 ;; esac
    if (( 8#$mode & 8#022 )); then echo "$d is writable by others (mode $mode)"; return 1; fi
    echo "$d"
}
