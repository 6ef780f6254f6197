"""`sdp.unreadable_line`: the line aiortc's parser fails on, with a bounded number of parses (a
line-by-line search parsed a 6000-line offer 6000 times and held the event loop for 39 s)."""

import pytest

from streamdiff.server import sdp

HEAD = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
        "a=rtpmap:96 VP8/90000\r\n")


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """The line count of every offer handed to aiortc's parser."""
    seen, real = [], sdp.aiortc_sdp.SessionDescription.parse

    def counted(text):
        seen.append(len(text.splitlines()))
        return real(text)

    monkeypatch.setattr(sdp.aiortc_sdp.SessionDescription, "parse", counted)
    return seen


@pytest.mark.parametrize("where", [0, 1, 417, 899])
def test_the_line_is_found_in_a_few_parses(parses, where):
    filler = [f"a=ssrc:{i} cname:x" for i in range(900)]
    filler.insert(where, "a=fingerprint:sha-256")  # no value: aiortc cannot split it
    offer = HEAD + "\r\n".join(filler) + "\r\n"
    assert sdp.unreadable_line(offer) == (7 + where, "a=fingerprint:sha-256")
    assert len(parses) <= 2 + 10  # the whole offer, then a bisection of 907 lines


def test_a_readable_offer_is_parsed_once_and_a_very_long_broken_one_is_not_searched(parses):
    assert sdp.unreadable_line(HEAD) is None and parses == [6]
    parses.clear()
    offer = HEAD + "a=ssrc:1 cname:x\r\n" * sdp.BISECTED_LINES + "a=rtpmap:96 VP8\r\n"
    assert sdp.unreadable_line(offer) is None and len(parses) == 1


def test_an_offer_with_hundreds_of_ssrc_lines_is_refused_before_aiortc_parses_it(parses):
    """aiortc's parser is quadratic in distinct a=ssrc lines (0.36 s a parse at 6000, an offer
    under the body limit, twice or more an offer, the event loop held): refused in one line."""
    many = HEAD + "a=mid:0\r\n" + "".join(f"a=ssrc:{i} cname:x\r\n" for i in range(sdp.MAX_SSRC_LINES + 1))
    with pytest.raises(sdp.SdpError, match=f"{sdp.MAX_SSRC_LINES + 1} a=ssrc lines"):
        sdp.check_offer_sdp(many)
    assert parses == []
    enough = HEAD + "a=mid:0\r\n" + "".join(f"a=ssrc:{i} cname:x\r\n" for i in range(sdp.MAX_SSRC_LINES))
    assert sdp.check_offer_sdp(enough) == ["video"] and len(parses) == 1
