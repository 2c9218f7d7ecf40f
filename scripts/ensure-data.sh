#!/bin/sh
# Make sure Fashion-MNIST (Debian package dataset-fashion-mnist) and the fortunes text corpus
# (Debian package fortunes, for the character-level GPTs) are on this machine.
# Installs them with apt-get where that is possible; otherwise says where to put the files.
DIR=/usr/share/datasets/fashion-mnist
FORTUNES=/usr/share/games/fortunes/fortunes
CAN_APT=0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    CAN_APT=1
fi
UPDATED=0
apt_install() {  # apt_install PACKAGE: update the package lists once, then install quietly
    [ "$CAN_APT" = 1 ] || return 1
    if [ "$UPDATED" = 0 ]; then
        apt-get update -qq >/dev/null || return 1
        UPDATED=1
    fi
    apt-get install -y -qq "$1" >/dev/null
}
if [ ! -f "$DIR/train-images-idx3-ubyte.gz" ] && [ ! -f "$DIR/train-images-idx3-ubyte" ]; then
    [ "$CAN_APT" = 1 ] && echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
    if ! apt_install dataset-fashion-mnist; then
        echo "Fashion-MNIST is not installed and could not be installed with apt-get." >&2
        echo "Install the Debian package dataset-fashion-mnist, or put the four IDX files" >&2
        echo "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte," >&2
        echo "optionally .gz) in a folder and pass it with --data-dir (or set OTFUSE_DATA_DIR)." >&2
    fi
fi
if [ ! -f "$FORTUNES" ]; then
    [ "$CAN_APT" = 1 ] && echo "Installing the fortunes text corpus (Debian package fortunes) ..."
    if ! apt_install fortunes; then
        echo "The fortunes corpus is not installed and could not be installed with apt-get." >&2
        echo "Install the Debian package fortunes, or put fortune files (entries separated by" >&2
        echo "lines holding only %) in a folder and set OTFUSE_TEXT_DIR." >&2
    fi
fi
exit 0
