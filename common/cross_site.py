"""The cross-site evaluation's vocabulary, shared by the aggregator and the sites.

At the end of a run the aggregator sends the final global model to every site once more as an
evaluate message whose config asks for the site's held-out `test` split (server.cross_site).
The site scores it there (its `val` split when it keeps no test rows) and names the split it
scored in the reply's `evaluation` record (client.app).
"""

from __future__ import annotations

# the direction of each site metric, for the worst site (declared with the metric names)
from common.registry import HIGHER_IS_BETTER as HIGHER_IS_BETTER
from common.registry import LOWER_IS_BETTER as LOWER_IS_BETTER

# the evaluate config's key asking for a split; per-round evaluations do not carry it (val)
SPLIT_KEY = "evaluate-split"
# what a site may be asked to score; `test` falls back to `val` at a site without test rows
SPLITS = ("val", "test")
# the reply's ConfigRecord and its key naming the split the site really scored
REPLY_RECORD = "evaluation"
REPLY_SPLIT = "split"

