"""Image ingestion for medfed: a site folder's labels.csv and images as model-ready arrays.

Public API: read_labels, load_image, load_mask, SiteData, check_site and the records they use.
"""

from common.data.card import DataCard, check_site
from common.data.errors import DataError, ImageError, Problem
from common.data.image import LoadedImage, load_image, load_mask
from common.data.labels import Row, read_labels
from common.data.preprocess import Preprocess
from common.data.site import SiteArrays, SiteData
from common.data.volume import ImageMeta

__all__ = [
    "DataCard",
    "DataError",
    "ImageError",
    "ImageMeta",
    "LoadedImage",
    "Preprocess",
    "Problem",
    "Row",
    "SiteArrays",
    "SiteData",
    "check_site",
    "load_image",
    "load_mask",
    "read_labels",
]
