"""curate: turn a crawl of image URLs and alt-texts into a filtered, de-duplicated image-text training set."""

__version__ = "0.1.0"
