"""What the two ends of a secure-aggregation run agree on beyond Flower's SecAgg+ protocol.

SecAgg+ runs on Flower's legacy messages (FitIns/FitRes), whose configs and metrics are flat
dicts of scalars. The aggregator sends the model's array names with the config, because legacy
parameters are an unnamed list; a site sends its name and its privacy report as metrics.
"""

from __future__ import annotations

# fit/evaluate config key: the model's array names in order, comma-joined
ARRAY_NAMES = "array-names"
# FitRes/EvaluateRes metric: the site's name (what the aggregator calls it in results.json)
SITE_NAME = "site-name"
# FitRes metrics `privacy-<key>`: the site's DP-SGD report (PrivacyState.summary)
PRIVACY_PREFIX = "privacy-"
