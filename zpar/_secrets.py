"""Shared secrets: their file format with its own salt, the entropy floor, file modes, and stretching.

A ``zpar keygen`` secret is one line, ``zpar-secret-v1:<salt>:<secret>``
(URL-safe base64): 256 random bits and a random salt of their own. Any other
secret (typed, or an older file) must score ``MIN_SECRET_BITS`` by a simple
estimate and is salted with a fixed label. Files that others may read are
refused. ``stretch`` turns a secret into 32 bytes once per process (scrypt
for a typed one); zpar.security turns those into the roles' CurveZMQ
keypairs. With no secret given, one user's processes share
``user_secret()``, made on first use.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import os
import secrets as _random
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

#: Shortest shared secret accepted, in bytes.
MIN_SECRET_BYTES = 16

#: Least estimated entropy of a secret without its own salt (typed, or an old file), in bits.
MIN_SECRET_BITS = 100

#: Secrets found in documentation, defaults and lists of common passwords.
WELL_KNOWN = frozenset({
    "", "changeme", "change-me", "password", "passw0rd", "secret", "default", "zpar", "zparzparzparzpar",
    "epo20pdosl;dksldkmm",  # Parallel Python's built-in default
    "0123456789abcdef", "1234567890123456", "abcdefghijklmnop", "passwordpassword", "secretsecretsecret",
    "correct horse battery staple", "letmeinletmeinletmein", "qwertyuiopasdfgh",
})

# Words and keyboard runs that a guesser tries first: each counts as one guess from a small list.
_COMMON_WORDS = (
    "password", "passw0rd", "secret", "letmein", "welcome", "qwerty", "azerty", "asdf", "zxcv", "admin",
    "login", "master", "dragon", "monkey", "shadow", "sunshine", "princess", "football", "baseball",
    "iloveyou", "trustno1", "changeme", "default", "zpar", "cluster", "test", "hello", "love", "summer",
    "winter", "spring", "autumn", "token", "key", "pass", "root", "user", "guest", "abc", "xyz",
)
_WORD_BITS = 11.0  # one pick from a list of about 2,000 common words: generous to the guessed

# The secret file's format: a version, then the salt and the secret (URL-safe base64, unpadded).
FILE_FORMAT = "zpar-secret-v1"
_SALT_BYTES = 16
_SECRET_BYTES = 32
# A secret with no salt of its own (typed, or an old file) is salted with this fixed label. That is
# acceptable only because such a secret must pass the entropy check: a salt stops a guesser from
# sharing work across clusters, and with >= 100 bits there is no guessing to share.
_LABEL_SALT = b"zpar unsalted secret v2"

# scrypt's cost: N = 2**17 (128 MiB, about 0.36 s on the 2-core build machine), paid once per
# process and secret, not per connection. 2**18 took 0.75 s there: over the 0.5 s budget.
SCRYPT_N = 2**17
_SCRYPT = {"n": SCRYPT_N, "r": 8, "p": 1, "maxmem": 256 << 20}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def generate_secret() -> str:
    """A strong random shared secret with its own random salt: ``zpar-secret-v1:<salt>:<secret>``.

    256 random bits and a 128-bit salt, URL-safe base64; one line, the format
    of a secret file and of ``ZPAR_SECRET``.
    """
    return f"{FILE_FORMAT}:{_b64(_random.token_bytes(_SALT_BYTES))}:{_b64(_random.token_bytes(_SECRET_BYTES))}"


def _salted(raw: bytes) -> tuple[bytes, bytes] | None:
    """(salt, secret) of a ``zpar keygen`` secret, None for any other text; ConfigError if malformed."""
    if not raw.startswith(b"zpar-secret-"):
        return None
    version, _, rest = raw.decode(errors="replace").partition(":")
    if version != FILE_FORMAT:
        raise ConfigError(f"this secret is in a format this zpar does not know ({version}); "
                          "make a new one with `zpar keygen`")
    salt_text, _, secret_text = rest.partition(":")
    try:
        salt, secret = _unb64(salt_text), _unb64(secret_text)
    except ValueError:
        salt = secret = b""
    if len(salt) != _SALT_BYTES or len(secret) != _SECRET_BYTES:
        raise ConfigError(f"this {FILE_FORMAT} secret is damaged (wrong length or characters); copy it "
                          "again, or make a new one with `zpar keygen`")
    if len(set(secret)) < 16:  # 32 random bytes have about 30 distinct values; it is not hashed slowly
        raise ConfigError(f"this {FILE_FORMAT} secret was not made at random; make one with `zpar keygen`")
    return salt, secret


def estimate_bits(text: str) -> float:
    """A deliberately simple estimate of how many guesses ``text`` takes (log2).

    Each character costs log2 of the size of the character classes used
    (lower, upper, digits, others); a common word costs one pick from a word
    list; a character that repeats or continues a run (``aaa``, ``1234``,
    ``abab``) or a repeated chunk costs one bit. A floor, not a proof: a
    ``zpar keygen`` secret needs none of this.
    """
    pool = sum(size for test, size in ((str.islower, 26), (str.isupper, 26), (str.isdigit, 10))
               if any(test(c) for c in text))
    pool += 33 if any(not (c.islower() or c.isupper() or c.isdigit()) for c in text) else 0
    per_char = math.log2(max(pool, 2))
    lowered, bits, i = text.lower(), 0.0, 0
    while i < len(text):
        word = max((w for w in _COMMON_WORDS if lowered.startswith(w, i)), key=len, default="")
        if word:
            bits += _WORD_BITS
            i += len(word)
            continue
        step = ord(text[i]) - ord(text[i - 1]) if i else 99
        repeated = i >= 2 and text[i - 2:i + 1] in text[:i]
        bits += 1.0 if abs(step) <= 1 or repeated else per_char
        i += 1
    return bits


def check_secret(secret: str | bytes) -> bytes:
    """The secret as bytes; ConfigError if it is empty, short, well known or too guessable.

    A ``zpar keygen`` secret (``zpar-secret-v1:...``) is checked for its
    format only; any other text must pass :func:`estimate_bits` (at least
    ``MIN_SECRET_BITS``).
    """
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    raw = raw.strip()
    if not raw:
        raise ConfigError("the secret is empty; make one with `zpar keygen`")
    if _salted(raw) is not None:
        return raw
    text = raw.decode(errors="replace")
    if text.lower() in WELL_KNOWN or len(set(raw)) <= 2:
        raise ConfigError("that secret is well known or trivial; make a strong one with `zpar keygen`")
    if len(raw) < MIN_SECRET_BYTES:
        raise ConfigError(f"the secret is {len(raw)} bytes; at least {MIN_SECRET_BYTES} are needed. "
                          "Make a strong one with `zpar keygen`")
    bits = estimate_bits(text)
    if bits < MIN_SECRET_BITS:
        raise ConfigError(f"that secret is too easy to guess (about {bits:.0f} bits; {MIN_SECRET_BITS} needed: "
                          "words, runs and repeats count for little). Make a strong one with `zpar keygen`")
    return raw


def check_private(path: str | os.PathLike[str], what: str) -> None:
    """ConfigError unless only its owner may read ``path`` (a secret file or a key's secret half).

    Files in systemd's ``$CREDENTIALS_DIRECTORY`` pass: systemd gives them to
    the unit's user alone, sometimes through an ACL that shows as group bits.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not st.st_mode & 0o077:
        return
    creds_dir = os.environ.get("CREDENTIALS_DIRECTORY")  # read per call, never at import
    if creds_dir and os.path.realpath(path).startswith(os.path.realpath(creds_dir) + os.sep):
        return
    raise ConfigError(f"the {what} {path} can be read by other users (mode {st.st_mode & 0o777:o}): whoever "
                      f"reads it can run code on the cluster. Run `chmod 600 {path}` (and make a new secret "
                      "with `zpar keygen` if others may have read it)")


def read_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The secret in ``path`` (surrounding whitespace ignored).

    ConfigError if the file is empty, weak, or readable by anyone but its
    owner; a strong file without a salt of its own (an older ``zpar keygen``)
    is accepted with a warning to make a new one.
    """
    if not os.fspath(path).strip():
        raise ConfigError("the secret file setting is empty; give a file made by `zpar keygen --out FILE`, "
                          "or unset it")
    check_private(path, "secret file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if not data.strip():
        raise ConfigError(f"the secret file {path} is empty; make one with `zpar keygen --out {path}`")
    raw = check_secret(data)
    if _salted(raw) is None:
        log.warning("secret file %s has no salt of its own (an older `zpar keygen`, or written by hand); "
                    "make a new one with `zpar keygen --out FILE` and give it to every node", path)
    return raw


def write_secret_file(path: str | os.PathLike[str]) -> None:
    """Write a new :func:`generate_secret` to ``path``, mode 600 from its creation; never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already; remove it first if you mean to replace the secret") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(generate_secret() + "\n")


_stretched: dict[tuple[bytes, bytes], bytes] = {}


def stretch(secret: str | bytes) -> bytes:
    """32 bytes from a shared secret, once per process.

    A ``zpar keygen`` secret is 256 random bits: no guesser can search that
    space, so stretching would only add its cost to every process start
    (0.36 s here); it is hashed with its own salt. Any other secret was typed
    by someone: scrypt (``SCRYPT_N``) with the fixed label makes each guess
    expensive.
    """
    raw = check_secret(secret)
    salted = _salted(raw)
    salt, key = salted if salted is not None else (_LABEL_SALT, raw)
    if (salt, key) not in _stretched:
        if salted is not None:
            _stretched[salt, key] = hashlib.blake2b(key, digest_size=32, salt=salt, person=b"zpar-secret-v1").digest()
        else:
            _stretched[salt, key] = hashlib.scrypt(key, salt=salt, dklen=32, **_SCRYPT)
    return _stretched[salt, key]


def user_secret_path() -> Path:
    """Where this user's own secret lives: ``$XDG_CONFIG_HOME/zpar/secret`` (``~/.config/zpar/secret``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "zpar" / "secret"


def user_secret() -> bytes:
    """This user's own secret, made on first use: what authenticates a cluster given no secret.

    Every process of one user (broker, agents, producers) finds the same
    file, so a cluster on one machine (or on machines sharing a home
    directory) needs nothing configured, and another account, which cannot
    read the file, is refused. The directory is 0700 and the file 0600; it
    is written whole under a temporary name and linked into place, so
    processes starting together all read one complete secret.
    """
    path = user_secret_path()
    folder = path.parent
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
            folder.chmod(0o700)  # mkdir's mode passes through the umask
        except FileExistsError:
            pass
        _check_own_folder(folder)
        if not path.exists():
            _create_user_secret(path)
    except OSError as exc:
        raise ConfigError(f"cannot make this user's zpar secret {path}: {exc.strerror or exc}. Set "
                          "XDG_CONFIG_HOME to a directory of yours, give a secret (ZPAR_SECRET_FILE, "
                          "--secret-file), or run --insecure on a machine only you use") from None
    return read_secret_file(path)


def _check_own_folder(folder: Path) -> None:
    st = folder.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ConfigError(f"{folder} holds this user's zpar secret but is not a directory of this user's "
                          f"alone (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}): others could replace "
                          f"the secret. Run `chmod 700 {folder}` as its owner, or set XDG_CONFIG_HOME elsewhere")


def _create_user_secret(path: Path) -> None:
    temporary = path.with_name(f".secret.{os.getpid()}.{_random.token_hex(4)}")
    write_secret_file(temporary)
    try:
        os.link(temporary, path)  # atomic, and never over a secret another process just made
        log.info("made this user's zpar secret %s: every zpar process of this user uses it unless given another",
                 path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
