"""curate: turn a crawl of image URLs and alt-texts into a filtered, de-duplicated image-text training set."""

import os

# torch's OpenMP threads spin while they wait at each parallel region. Our stages run decode threads
# (and often other workers) beside torch, and spinning threads then steal the cores the work needs:
# training on 2 cores ran up to 5x slower. Read once, when torch loads, so it is set before any import
# of torch; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# img2dataset imports albumentations, which asks PyPI for a newer version on import unless this is set.
# Set here, before any module of ours can import img2dataset, so no import of curate reaches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
