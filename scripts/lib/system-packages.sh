# Sourced by scripts/test: installs missing Debian packages when it can (as root, with
# apt-get, as .ci/run does); otherwise it says exactly what to install.
#
# install_packages WHAT PACKAGE...: returns 0 once the packages are installed, 1 after saying
# what could not be installed and how to install it.

apt_updated=""

install_packages() {
    local what=$1
    shift
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test: $what is missing: installing it (apt-get install $*)" >&2
        export DEBIAN_FRONTEND=noninteractive
        if [ -z "$apt_updated" ]; then
            apt-get update -qq >&2 || true
            apt_updated=1
        fi
        if apt-get install -y -qq --no-install-recommends "$@" >&2; then
            return 0
        fi
        echo "scripts/test: could not install $what: \`apt-get install $*\` failed (output above)" >&2
        return 1
    fi
    echo "scripts/test: $what is missing, and this script installs packages only as root with apt-get." >&2
    if command -v apt-get >/dev/null 2>&1; then
        echo "  Install it with:  sudo apt-get install $*" >&2
    else
        echo "  Install your system's equivalent of the Debian packages: $*" >&2
    fi
    return 1
}
