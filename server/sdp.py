"""SDP for the gateway: checks before aiortc parses an offer, H.264 preference, simulcast
offers and ICE gathering.

Owns: `check_offer_sdp` (malformed, video present), `video_directions` (which way the offer's
video goes: a WHIP offer must send it, a WHEP offer receive it), `require_video_codec` (a codec
aiortc can receive or send: OBS's encoders, players), the simulcast rules (one layer accepted, several refused: aiortc cannot receive simulcast),
`prefer_h264` for WHEP answers, audio sections with no codec aiortc has (rejected in the answer,
RFC 3264, not the whole offer), and `wait_ice_gathering` (no trickle: candidates go in the answer).
Does not own: HTTP (server.app) or media tracks (server.webrtc).
"""

from __future__ import annotations

import asyncio
import re

from aiortc import RTCPeerConnection
from aiortc import sdp as aiortc_sdp


class SdpError(ValueError):
    """The offer is not SDP we can use (HTTP 400)."""


class CodecError(ValueError):
    """The offer has no codec we can take (HTTP 406)."""


H264_HINT = (
    "the offer has no H.264 video: StreamDiff's WHIP endpoint takes H.264 (or VP8). In OBS open "
    "Settings -> Output (Output Mode: Advanced) -> Streaming and pick an H.264 video encoder "
    "(x264, NVENC H.264, QuickSync H.264 or Apple VT H.264), not AV1 or HEVC."
)


def check_offer_sdp(sdp: str, *, need_video: bool = True) -> list[str]:
    """Basic shape checks before aiortc parses the SDP; returns the m-line kinds."""
    lines = [line.strip() for line in sdp.strip().splitlines()]
    if not lines or lines[0] != "v=0":
        raise SdpError("malformed SDP: it must start with 'v=0'")
    sections = _media_sections(sdp)[1]
    kinds = [kind for kind, _ in sections]
    if not kinds:
        raise SdpError("malformed SDP: no media section ('m=' line)")
    if need_video and "video" not in kinds:
        raise SdpError("the offer has no video media section")
    seen: set[str] = set()
    for mid in (line[6:] for _, section in sections for line in section if line.startswith("a=mid:")):
        if mid in seen:  # aiortc took it, then failed at its answer (a probe): the offer had a place by then
            raise SdpError(f"malformed SDP: a=mid:{mid} names two media sections (each needs its own)")
        seen.add(mid)
    if (ssrcs := sum(line.startswith("a=ssrc:") for line in lines)) > MAX_SSRC_LINES:
        # aiortc's parser takes time growing with their square (0.36 s a parse at 6000, a 119 kB
        # offer), and every stream's frames wait on the event loop meanwhile
        raise SdpError(f"malformed SDP: {ssrcs} a=ssrc lines (at most "
                       f"{MAX_SSRC_LINES} are taken; a browser or OBS sends a few)")
    if (bad := unreadable_line(sdp)) is not None:
        number, line = bad
        shown = line if len(line) <= 80 else line[:77] + "..."  # (shown with !r: control characters escaped)
        pt = re.match(r"a=fmtp:(\S+)", line)
        if pt and not re.search(rf"^a=rtpmap:{re.escape(pt.group(1))}\s", sdp, re.MULTILINE):
            raise SdpError(f"malformed SDP: line {number} ({shown!r}) is for a payload type no a=rtpmap line defines")
        raise SdpError(f"malformed SDP: line {number} cannot be read: {shown!r}")
    return kinds


MAX_SSRC_LINES = 256  # simulcast with RTX from a browser: about 12
BISECTED_LINES = 1000  # an offer is 50-300 lines; a longer one that fails gets aiortc's own words


def unreadable_line(sdp: str) -> tuple[int, str] | None:
    """(1-based number, text) of the line aiortc's SDP parser fails on: the end of the shortest
    prefix of the offer it cannot parse, found by bisection (a line-by-line search parsed a
    6000-line offer 6000 times, 39 s of the event loop); None when it parses the whole offer. A
    probe: an `a=fingerprint` without its value, an `a=rtpmap` without a clock rate, an `m=` line
    with a payload type of 300 were refused as "could not negotiate the offer" and a ValueError on
    the console that named no line. Most attributes are read line by line; an `a=fmtp` before its
    payload's `a=rtpmap` could be named instead of the line at fault (browsers and OBS write the
    rtpmap first). Over `BISECTED_LINES` lines, None (the search would hold the event loop)."""
    def parses(text: str) -> bool:
        try:
            aiortc_sdp.SessionDescription.parse(text)
        except Exception:  # noqa: BLE001 - any failure of the parser is the offer's
            return False
        return True

    if parses(sdp):
        return None
    lines = sdp.splitlines()
    if len(lines) > BISECTED_LINES:  # each parse of a long offer can take aiortc 0.3 s (its a=ssrc lines)
        return None
    good, bad = 0, len(lines)  # a prefix of `good` lines parses (none: nothing to fail), of `bad` does not
    while bad - good > 1:
        mid = (good + bad) // 2
        if parses("\r\n".join(lines[:mid]) + "\r\n"):
            good = mid
        else:
            bad = mid
    return bad, lines[bad - 1]


DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


def _media_sections(sdp: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The session-level lines and, per m-section, its kind and its lines (stripped; the m-line
    first). The readers below take what they need from it."""
    session: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    for line in (line.strip() for line in sdp.splitlines()):
        if line.startswith("m="):
            sections.append((line[2:].split(" ", 1)[0], [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            session.append(line)
    return session, sections


def _video_lines(sdp: str) -> list[list[str]]:
    return [lines for kind, lines in _media_sections(sdp)[1] if kind == "video"]


def video_directions(sdp: str) -> list[str]:
    """The direction of each video m-section, as the offerer sees it: its own `a=` direction
    attribute, else the session-level one, else sendrecv (RFC 8866)."""
    session, sections = _media_sections(sdp)

    def direction(lines: list[str], default: str) -> str:
        return next((line[2:] for line in lines if line.startswith("a=") and line[2:] in DIRECTIONS), default)

    default = direction(session, "sendrecv")
    return [direction(lines, default) for kind, lines in sections if kind == "video"]


def directions_per_section(sdp: str) -> str:
    """The offer with a session-level direction attribute (RFC 8866 allows one) written into each
    m-section that has none of its own, and removed from the session: aiortc reads directions per
    section only and failed on such an offer at its answer (`None is not in list`, a probe)."""
    session, sections = _media_sections(sdp)
    said = [line for line in session if line.startswith("a=") and line[2:] in DIRECTIONS]
    if not said:
        return sdp
    eol = "\r\n" if "\r\n" in sdp else "\n"
    out = [line for line in session if line not in said and line]
    for _, lines in sections:
        own = any(line.startswith("a=") and line[2:] in DIRECTIONS for line in lines)
        out += [line for line in lines if line] + ([] if own else [said[0]])
    return eol.join(out) + eol


def require_directions(sdp: str, *, sends: bool, receives: bool, what: str) -> None:
    """SdpError unless some video section sends (`sends`) and some receives (`receives`), as
    the offerer sees it. `what` completes the message: where the client should go instead."""
    directions = video_directions(sdp)
    said = "/".join(sorted(set(directions))) or "absent"
    if sends and not any(d in ("sendonly", "sendrecv") for d in directions):
        raise SdpError(f"the offer's video is {said}: it sends no video to restyle; {what}")
    if receives and not any(d in ("recvonly", "sendrecv") for d in directions):
        raise SdpError(f"the offer's video is {said}: it receives no video; {what}")


def video_codecs(sdp: str) -> set[str]:
    """Codec names (upper case) offered in the video m-sections."""
    return {line.split(" ", 1)[1].split("/", 1)[0].upper() for lines in _video_lines(sdp) for line in lines
            if line.startswith("a=rtpmap:") and " " in line}


def h264_payloads(sdp: str) -> list[tuple[str, str]]:
    """(profile-level-id, packetization-mode) of each H.264 payload type offered for video, as
    aiortc reads them: 42e01f where an fmtp line leaves the profile out, mode 0 where it leaves
    the mode out; lower case, "unreadable" for a profile that is not 6 hex digits."""
    payloads = []
    for lines in _video_lines(sdp):
        rtpmaps = [line[9:].split() for line in lines if line.startswith("a=rtpmap:")]
        h264 = [parts[0] for parts in rtpmaps if len(parts) == 2 and parts[1].upper().startswith("H264/")]
        fmtp = {}
        for line in lines:
            if line.startswith("a=fmtp:") and " " in line:
                pt, params = line[7:].split(" ", 1)
                fmtp[pt] = dict(p.strip().split("=", 1) for p in params.split(";") if "=" in p)
        for pt in h264:
            profile = fmtp.get(pt, {}).get("profile-level-id", "42e01f").lower()
            mode = fmtp.get(pt, {}).get("packetization-mode", "0").strip()
            payloads.append((profile if re.fullmatch(r"[0-9a-f]{6}", profile) else "unreadable",  # never echo raw bytes
                             mode if mode in ("0", "1", "2") else "unreadable"))
    return payloads


# Video codecs besides the media ones an offer lists (retransmission, redundancy, FEC)
_HELPER_CODECS = {"RTX", "RED", "ULPFEC", "FLEXFEC-03", "FLEXFEC"}
_PROFILE_NAMES = {"4d": "Main", "58": "Extended", "64": "High", "6e": "High 10", "7a": "High 4:2:2", "f4": "High 4:4:4"}


def require_video_codec(sdp: str, *, player: bool = False) -> None:
    """CodecError (406) unless the offer's video has a codec aiortc can use: VP8, or H.264 in
    Constrained Baseline or Baseline profile (profile_idc 0x42; FFmpeg's libx264 defaults to High)
    with packetization-mode 1 (aiortc's only one; mode 0 is what an fmtp line without it means).
    `player`: the offer is a WHEP player's (the message speaks to it, not to OBS's encoder)."""
    names = video_codecs(sdp)
    if "VP8" in names:
        return
    payloads = h264_payloads(sdp)
    if any(profile.startswith("42") and mode == "1" for profile, mode in payloads):
        return
    if not payloads:
        if not player:
            raise CodecError(H264_HINT)
        offered = ", ".join(sorted(n if re.fullmatch(r"[A-Z0-9-]{1,20}", n) else "an unreadable codec"
                                   for n in names - _HELPER_CODECS)) or "no codec"
        raise CodecError(PLAYER_CODEC_HINT.format(offered=offered))
    if any(profile.startswith("42") for profile, _ in payloads):
        raise CodecError(H264_MODE_HINT.format(who="player" if player else "publisher"))
    offered = ", ".join(sorted({"an unreadable profile-level-id" if profile == "unreadable"
                                else f"{_PROFILE_NAMES.get(profile[:2], 'profile_idc 0x' + profile[:2])} ({profile})"
                                for profile, _ in payloads}))
    raise CodecError((PLAYER_PROFILE_HINT if player else H264_PROFILE_HINT).format(offered=offered))


H264_PROFILE_HINT = (
    "the offer's H.264 is {offered} only: StreamDiff's WHIP endpoint receives Constrained Baseline or "
    "Baseline H.264 (or VP8). In OBS set the x264 profile to baseline (Settings -> Output -> Streaming); "
    "with FFmpeg add -profile:v baseline."
)
PLAYER_PROFILE_HINT = (
    "the player's H.264 is {offered} only: StreamDiff plays Constrained Baseline or Baseline H.264, or VP8"
)
PLAYER_CODEC_HINT = (
    "the player offers {offered} video only: StreamDiff plays H.264 (Constrained Baseline or Baseline) or VP8"
)
H264_MODE_HINT = (
    "the {who}'s H.264 offers no packetization-mode=1 (an fmtp line without one means mode 0): "
    "StreamDiff's WebRTC stack takes packetization-mode=1 (non-interleaved) H.264, or VP8"
)


SIMULCAST_HINT = (
    "the offer sends {n} simulcast layers (OBS: Settings -> Stream -> Total Layers = {n}); StreamDiff "
    "takes one layer only (aiortc cannot receive simulcast): set Total Layers to 1"
)


def simulcast_rids(sdp: str) -> list[str]:
    """The send rids (simulcast layers) of the video section; [] for a plain offer."""
    rids = [line[6:].split() for lines in _video_lines(sdp) for line in lines if line.startswith("a=rid:")]
    return [parts[0] for parts in rids if len(parts) >= 2 and parts[1] == "send"]


def accept_simulcast(offer_sdp: str) -> tuple[str, list[str]]:
    """A one-layer simulcast offer becomes a plain one for aiortc (its rid and simulcast lines
    removed; `answer_simulcast` adds the matching recv lines to the answer). Several layers are
    refused with SdpError naming the OBS setting."""
    rids = simulcast_rids(offer_sdp)
    if len(rids) > 1:
        raise SdpError(SIMULCAST_HINT.format(n=len(rids)))
    if not rids:
        return offer_sdp, []
    eol = "\r\n" if "\r\n" in offer_sdp else "\n"
    kept = [line for line in offer_sdp.splitlines()
            if not line.strip().startswith(("a=rid:", "a=simulcast:"))]
    return eol.join(kept) + eol, rids


def answer_simulcast(answer_sdp: str, rids: list[str]) -> str:
    """Accept every offered layer in the answer's video section (`a=rid:X recv`, `a=simulcast:recv`)."""
    if not rids:
        return answer_sdp
    eol = "\r\n" if "\r\n" in answer_sdp else "\n"
    out, in_video = [], False
    for line in answer_sdp.splitlines():
        if line.startswith("m="):
            if in_video:
                out += [f"a=rid:{rid} recv" for rid in rids] + [f"a=simulcast:recv {';'.join(rids)}"]
            in_video = line.startswith("m=video")
        out.append(line)
    if in_video:
        out += [f"a=rid:{rid} recv" for rid in rids] + [f"a=simulcast:recv {';'.join(rids)}"]
    return eol.join(out) + eol


def stand_in_for_unknown_audio(sdp: str) -> tuple[str, list[str]]:
    """RFC 3264: an offered section with no codec in common is rejected in the answer (port 0), the
    others are answered. aiortc refused the whole offer instead ("Failed to set remote audio
    description send parameters": a probe's publisher offering AAC audio, which the server ignores
    anyway, was refused 400, as was a player offering it). Each audio section with no codec aiortc has
    goes to aiortc inactive, PCMU standing in for its codecs; returns that offer and the mids whose
    sections `reject_sections` rejects in the answer."""
    from aiortc.codecs import CODECS
    from aiortc.rtcpeerconnection import find_common_codecs
    from aiortc.sdp import SessionDescription

    try:
        parsed = SessionDescription.parse(sdp).media
    except Exception:  # noqa: BLE001 - malformed: the trial peer says why
        return sdp, []
    session, sections = _media_sections(sdp)
    if len(parsed) != len(sections):
        return sdp, []
    out, rejected = [line for line in session if line], []
    for media, (kind, lines) in zip(parsed, sections):
        if kind == "audio" and media.rtp.muxId and not find_common_codecs(CODECS["audio"], media.rtp.codecs):
            rejected.append(media.rtp.muxId)
            lines = [" ".join(lines[0].split()[:3] + ["0"])] + [
                line for line in lines[1:] if not line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"))
                and line[2:] not in DIRECTIONS] + ["a=rtpmap:0 PCMU/8000", "a=inactive"]
        out += [line for line in lines if line]
    if not rejected:
        return sdp, []
    eol = "\r\n" if "\r\n" in sdp else "\n"
    return eol.join(out) + eol, rejected


def reject_sections(answer_sdp: str, mids: list[str]) -> str:
    """The answer with the sections of `mids` rejected (RFC 3264: port 0, inactive; RFC 8843: out
    of the BUNDLE group)."""
    if not mids:
        return answer_sdp
    eol = "\r\n" if "\r\n" in answer_sdp else "\n"
    session, sections = _media_sections(answer_sdp)
    out = []
    for line in session:
        if line.startswith("a=group:BUNDLE"):
            line = " ".join(item for item in line.split(" ") if item not in mids)
        if line:
            out.append(line)
    for _, lines in sections:
        if next((line[6:] for line in lines if line.startswith("a=mid:")), None) in mids:
            m = lines[0].split()  # (as a browser rejects one: its other lines kept, no candidates or stream)
            kept = [line for line in lines[1:]
                    if not line.startswith(("a=candidate:", "a=end-of-candidates", "a=ssrc", "a=msid:"))]
            lines = [" ".join([m[0], "0", *m[2:]]), *(
                "a=inactive" if line[2:] in DIRECTIONS else "c=IN IP4 0.0.0.0" if line.startswith("c=") else line
                for line in kept)]
        out += [line for line in lines if line]
    return eol.join(out) + eol


def prefer_h264(pc: RTCPeerConnection) -> None:
    """Put H.264 (and its retransmission codec) first in every video transceiver's negotiated
    codecs, after setRemoteDescription: the answer then leads with H.264 and the sender uses it.
    WHEP players (OBS's WHEP source among them) expect H.264."""
    for transceiver in pc.getTransceivers():
        codecs = getattr(transceiver, "_codecs", None)
        if transceiver.kind != "video" or not codecs:
            continue
        h264_pts = {c.payloadType for c in codecs if c.mimeType.lower() == "video/h264"}
        if not h264_pts:
            continue

        def rank(codec) -> int:
            if codec.payloadType in h264_pts:
                return 0
            if codec.mimeType.lower() == "video/rtx" and codec.parameters.get("apt") in h264_pts:
                return 1
            return 2

        transceiver._codecs = sorted(codecs, key=rank)


async def wait_ice_gathering(pc: RTCPeerConnection, timeout_s: float = 10.0) -> None:
    """No trickle: wait until every local candidate is in the local description."""
    if pc.iceGatheringState == "complete":
        return
    done = asyncio.Event()

    @pc.on("icegatheringstatechange")
    def _changed() -> None:
        if pc.iceGatheringState == "complete":
            done.set()

    if pc.iceGatheringState != "complete":
        await asyncio.wait_for(done.wait(), timeout_s)
