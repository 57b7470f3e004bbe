"""The failure a site reports to the aggregator: its kind, never its details (client.outbound)."""


class SiteFailure(RuntimeError):
    """What the aggregator is told when the site fails: the kind of failure, no details."""


def failure_text(site: str, kind: str, cause: str) -> str:
    """The reason a deployed site sends: which message failed and the failure's kind."""
    return f"site {site}: {kind} failed ({cause}); the details stay in the site's own log"
