"""Wallets: standard encrypted keystore JSON files (never a private key on the command line).

The password comes from --wallet-password-file, else $ATLAS_WALLET_PASSWORD, else an interactive prompt.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import Optional

from eth_account import Account

from atlas_swarm.errors import WalletError

PASSWORD_ENV = "ATLAS_WALLET_PASSWORD"


def read_password(password_file: Optional[str], prompt: str = "Wallet password: ") -> str:
    if password_file:
        try:
            return Path(password_file).read_text().rstrip("\n")
        except OSError as e:
            raise WalletError(f"Cannot read --wallet-password-file {password_file!r}: {e.strerror}.") from None
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV]
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    raise WalletError(f"The wallet is encrypted: pass --wallet-password-file FILE or set ${PASSWORD_ENV}.")


def load_wallet(path: str, password: str):
    """The LocalAccount in keystore ``path``."""
    try:
        keystore = json.loads(Path(path).read_text())
    except OSError as e:
        raise WalletError(f"Cannot read --wallet {path!r}: {e.strerror}. Create one with "
                          f"`python -m atlas_swarm.chain new-wallet {path}`.") from None  # fmt: skip
    except ValueError:
        raise WalletError(f"--wallet {path!r} is not a keystore JSON file.") from None
    try:
        key = Account.decrypt(keystore, password)
    except ValueError as e:
        if "MAC mismatch" in str(e):
            raise WalletError(f"Wrong password for wallet {path!r}.") from None
        raise WalletError(f"--wallet {path!r} is not a valid keystore: {e}.") from None
    except Exception as e:
        raise WalletError(f"--wallet {path!r} is not a valid keystore ({type(e).__name__}).") from None
    return Account.from_key(key)


def create_wallet(path: str, password: str, private_key: Optional[bytes] = None, kdf: str = "scrypt"):
    """Write a new (or the given) key as an encrypted keystore, mode 0600; refuses to overwrite."""
    account = Account.from_key(private_key) if private_key is not None else Account.create()
    keystore = Account.encrypt(account.key, password, kdf=kdf)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise WalletError(f"{path!r} exists already; not overwriting a wallet.") from None
    with os.fdopen(fd, "w") as f:
        json.dump(keystore, f)
    return account
