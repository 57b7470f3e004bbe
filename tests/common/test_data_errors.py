"""The reason a file is skipped: one line, and the same text every time the same file is read."""

import io

from common.data.errors import described


def test_an_object_repr_in_an_error_gives_the_same_reason_on_every_read() -> None:
    """pillow names the stream it failed on (`<_io.BytesIO object at 0x7fe1...>`); the address
    differs between a cold read and a cached one, and the reason must not (the data card, the
    site's log and the cache compare them)."""
    streams = io.BytesIO(), io.BytesIO()  # both alive: two addresses
    first, second = (OSError(f"cannot identify image file {s!r}") for s in streams)
    assert str(first) != str(second)
    assert described(first) == described(second)
    assert described(first) == "OSError: cannot identify image file <_io.BytesIO object>"


def test_a_reason_is_one_line_and_cut_to_a_card_width() -> None:
    text = described(ValueError("a\nb   c" + "x" * 1000))
    assert "\n" not in text and text.startswith("ValueError: a b c") and text.endswith("...")
