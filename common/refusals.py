"""A site's refusal, cut back out of the error reason the aggregator receives.

A site refuses a message by raising an exception whose text starts with a mark: its privacy
budget (`common.privacy.REFUSAL_MARK`), an app version its hospital has not approved
(`common.apps.APP_REFUSAL_MARK`), or a run its policy does not allow
(`common.policy.RUN_REFUSAL_MARK`). Flower wraps a ClientApp's exception in its own text
("<class '...'>:<'TEXT'>", and Ray in more); the aggregator records a refusal (policy, exit 3)
rather than an error only when it finds one of the marks.
"""

from __future__ import annotations

import re


def cut_refusal(reason: str, mark: str) -> tuple[str, str | None] | None:
    """(the refusal's own text, the refusing site's name) from an error reply's reason.

    None when `reason` holds no refusal marked `mark`. The site's name is the word after
    "MARK: site ", as every refusal is written; None when the text names no site.
    """
    at = reason.find(mark)
    if at < 0:
        return None
    text = re.split(r"'>|\n", reason[at:], maxsplit=1)[0].strip()
    site = re.match(re.escape(mark) + r": site ([A-Za-z0-9][A-Za-z0-9._-]*) ", text)
    return text, (site.group(1) if site else None)
