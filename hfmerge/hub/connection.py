"""Turning a failure to reach the Hub into one line that names the endpoint and the way out.

huggingface_hub lets transport errors of its HTTP client (a refused
connection, an unknown host, a timeout) escape as they are. hfmerge's first
request to the Hub in every command is one that huggingface_hub does not
retry (``model_info``, ``whoami``), with a bounded timeout, so an unreachable
endpoint fails in about a second instead of after the ~23 s of retries that
``hf_hub_download`` spends on file metadata.
"""

from __future__ import annotations

from huggingface_hub import constants as hf_constants

from hfmerge.errors import HubUnreachableError


def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2; earlier releases httpx
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


TRANSPORT_ERRORS: tuple[type[BaseException], ...] = _transport_errors()


def hub_unreachable(exc: BaseException, *, name: str | None = None) -> HubUnreachableError:
    """The user-facing error for a transport failure ``exc`` while talking to the Hub.

    ``name``: the reference, written as a repo id (``org/name``), that was looked for on the Hub because no
    folder of that name exists here. A mistyped relative folder (``sources/vit-mirorred``) reads that way, so
    the message says that no such folder exists too, or the user would look for the fault in the network alone.
    """
    if "Timeout" in type(exc).__name__:
        reason = "timed out"
    else:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    unreachable = f"cannot reach the Hub at {hf_constants.ENDPOINT} ({reason})"
    way_out = "check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use models already in the local cache"
    if name is None:
        return HubUnreachableError(f"{unreachable}; {way_out}")
    return HubUnreachableError(f"{unreachable} to look for {name} there, and there is no folder {name!r} here: "
                               f"check the path; or {way_out}")
