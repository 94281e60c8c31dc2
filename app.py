"""Start the zimage web studio: settings -> engine -> server. `python app.py --help` lists every setting."""

import sys

from zimage.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
