# Sourced by scripts/ensure-*.sh. One function:
#
#   pip_pinned NAME PACKAGE VERSION RELPATH [CHECK]
#
# installs PACKAGE==VERSION with pip into the venv $KOUBOU_CACHE/venv-NAME (default
# ~/.cache/koubou/venv-NAME) unless that exact version is already there, one installer at a time
# (concurrent test runs may call it together), checks that pip installed that version, runs the
# function CHECK (given the path) after a fresh install, and prints the path of venv-NAME/RELPATH
# on stdout. Progress goes to stderr. Env: PYTHON (default python3) makes the venv.
pip_pinned() {
    local name=$1 pkg=$2 version=$3 rel=$4 check=${5:-}
    local cache="${KOUBOU_CACHE:-$HOME/.cache/koubou}"
    local venv="$cache/venv-$name"
    local py="$venv/bin/python" stamp="$venv/.koubou-installed-$version" path="$venv/$rel"
    if [[ -x "$py" && -f "$stamp" && -e "$path" ]]; then
        echo "$path"
        return 0
    fi
    mkdir -p "$cache"
    exec 9>"$cache/.venv-$name.lock"
    flock 9
    if [[ -x "$py" && -f "$stamp" && -e "$path" ]]; then
        echo "$path"
        return 0
    fi
    echo "ensure-$name: installing $pkg==$version into $venv" >&2
    rm -f "$venv"/.koubou-installed-*
    if [[ ! -x "$py" ]]; then
        "${PYTHON:-python3}" -m venv "$venv" >&2
    fi
    "$py" -m pip install --quiet --disable-pip-version-check "$pkg==$version" >&2
    local got
    got="$("$py" -c "import importlib.metadata as m; print(m.version('$pkg'))")"
    if [[ "$got" != "$version" ]]; then
        echo "ensure-$name: installed $pkg $got, expected $version" >&2
        return 1
    fi
    if [[ ! -e "$path" ]]; then
        echo "ensure-$name: pip finished but $path is missing" >&2
        return 1
    fi
    if [[ -n "$check" ]]; then
        "$check" "$path" >&2
    fi
    touch "$stamp"
    echo "$path"
}
