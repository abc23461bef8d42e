"""Counting what the DHT drops: a record validator that wraps a node's validators and counts each rejection.

hivemind validates every record a node stores or receives in a lookup (signature, then schema) and silently drops the
ones that fail. A monitor must say how many it dropped, so its node uses ``AuditingValidator`` as its only validator;
the signature and schema validators live inside it. It runs in the DHT's own process: ``rejected_counts(dht)``
fetches its counters from there.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase


class AuditingValidator(RecordValidatorBase):
    def __init__(self, validators=()):
        self._validators: list[RecordValidatorBase] = []
        self.rejected: Counter = Counter()
        for v in validators:
            self._add(v)

    def _add(self, new: RecordValidatorBase) -> None:
        for existing in self._validators:
            if existing.merge_with(new):
                return
        self._validators.append(new)
        self._validators.sort(key=lambda v: v.priority)

    def merge_with(self, other: RecordValidatorBase) -> bool:
        """Validators added later (DHT.add_validators) join the audited set."""
        if isinstance(other, AuditingValidator):
            for v in other._validators:
                self._add(v)
        else:
            self._add(other)
        return True

    def validate(self, record: DHTRecord) -> bool:  # the same order as hivemind's CompositeValidator
        for i, validator in enumerate(reversed(self._validators)):
            if not validator.validate(record):
                self.rejected[_reason(validator)] += 1
                return False
            if i < len(self._validators) - 1:
                record = dataclasses.replace(record, value=validator.strip_value(record))
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        for validator in self._validators:
            record = dataclasses.replace(record, value=validator.sign_value(record))
        return record.value

    def strip_value(self, record: DHTRecord) -> bytes:
        for validator in reversed(self._validators):
            record = dataclasses.replace(record, value=validator.strip_value(record))
        return record.value

    @property
    def priority(self) -> int:
        return 0


def _reason(validator: RecordValidatorBase) -> str:
    if isinstance(validator, RSASignatureValidator):
        return "signature"
    if isinstance(validator, SchemaValidator):
        return "schema"
    return type(validator).__name__


async def _read_counts(dht, node) -> dict[str, int]:
    found = {}
    stack = [node.protocol.record_validator]
    while stack:
        v = stack.pop()
        if isinstance(v, AuditingValidator):
            found.update(v.rejected)
        stack.extend(getattr(v, "_validators", []))
    return dict(found)


def rejected_counts(dht) -> dict[str, int]:
    """{"signature": n, "schema": m} rejected so far by the node's AuditingValidator (empty if it has none)."""
    return dht.run_coroutine(_read_counts)
