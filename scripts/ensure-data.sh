#!/bin/sh
# Make sure Fashion-MNIST (Debian package dataset-fashion-mnist) is on this machine.
# Installs it with apt-get where that is possible; otherwise says where to put the files.
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] || [ -f "$DIR/train-images-idx3-ubyte" ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
    if apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
        exit 0
    fi
fi
echo "Fashion-MNIST is not installed and could not be installed with apt-get." >&2
echo "Install the Debian package dataset-fashion-mnist, or put the four IDX files" >&2
echo "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte," >&2
echo "optionally .gz) in a folder and pass it with --data-dir (or set OTFUSE_DATA_DIR)." >&2
exit 0
