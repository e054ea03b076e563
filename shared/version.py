"""Protocol version and media types: the one place both sides read them from.

The major number changes when an old client could misread a new server's answer; the client
refuses a server whose major differs (see opd.client), the server reports its version in
GET /v1/model and in every score response.
"""

PROTOCOL_VERSION = "1.4"  # 1.1: /v1/generate; 1.2: token_rank; 1.3: score_spans; 1.4: /v1/tokenizer
PROTOCOL_MAJOR = PROTOCOL_VERSION.split(".")[0]
# The first version that serves score_spans: a client checks a teacher before sending spans.
SCORE_SPANS_SINCE = (1, 3)
# The first version that hands out its tokenizer (GET /v1/tokenizer), for cross-tokenizer OPD.
TOKENIZER_ROUTE_SINCE = (1, 4)


def at_least(version: str, since: tuple[int, int]) -> bool:
    """Whether a "MAJOR.MINOR" protocol version is `since` or later."""
    major, _, minor = version.partition(".")
    return (int(major), int(minor or 0)) >= since


# Content-Type / Accept values. JSON is for humans and curl; msgpack carries raw arrays.
JSON_MEDIA_TYPE = "application/json"
MSGPACK_MEDIA_TYPE = "application/vnd.opd+msgpack"
