"""A one-line progress bar on stderr (no dependency), for the quantizer and the converter."""

import sys


def progress(i, n, what, stream=None):
    stream = sys.stderr if stream is None else stream
    width = 30
    done = int(width * i / max(n, 1))
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {what[-60:]:<60}")
    if i == n:
        stream.write("\n")
    stream.flush()
