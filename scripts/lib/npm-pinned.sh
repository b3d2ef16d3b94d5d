# Sourced by scripts/ensure-*.sh. One function:
#
#   npm_pinned NAME PACKAGE VERSION RELPATH [CHECK]
#
# installs PACKAGE@VERSION with npm into $KOUBOU_CACHE/NAME (default ~/.cache/koubou/NAME) unless
# that exact version is already there, one installer at a time (concurrent test runs may call it
# together), runs the function CHECK (given the path) after a fresh install, and prints the path
# of NAME/RELPATH on stdout. Progress goes to stderr.
npm_pinned() {
    local name=$1 pkg=$2 version=$3 rel=$4 check=${5:-}
    local cache="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
    local dir="$cache/$name"
    local stamp="$dir/.koubou-installed-$version" path="$dir/$rel"
    if [[ -f "$stamp" && -e "$path" ]]; then
        echo "$path"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        echo "ensure-$name: npm is needed to install $pkg@$version (apt-get install npm)" >&2
        return 1
    fi
    mkdir -p "$dir"
    exec 9>"$cache/.$name.lock"
    flock 9
    if [[ -f "$stamp" && -e "$path" ]]; then
        echo "$path"
        return 0
    fi
    echo "ensure-$name: installing $pkg@$version into $dir" >&2
    rm -f "$dir"/.koubou-installed-*
    npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "$pkg@$version" >&2
    if [[ ! -e "$path" ]]; then
        echo "ensure-$name: npm finished but $path is missing" >&2
        return 1
    fi
    if [[ -n "$check" ]]; then
        "$check" "$path"
    fi
    touch "$stamp"
    echo "$path"
}
