"""Data pipeline of tiedmoe: build packed token shards offline and stream fixed-length windows from them.

Entry points: `python -m data_prep.build` (see `data_prep.build`), `TokenWindowLoader` (packed shards),
`StreamingTokenLoader` (tokenize on the fly), `load_manifest`, `check_vocab`.
"""

from data_prep.errors import DataError

__all__ = ["DataError"]
