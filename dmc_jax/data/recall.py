"""Recall rows: short facts (a label and a random number) spliced into real text and stated again later in the row.

Why: a learned cache policy (DMS, DMC) trained by distillation on plain text is only penalized for dropping a token
when the teacher's next-token distribution needed it. Ordinary prose rarely needs one exact token from far back,
so the policy learns to drop numbers, and retrieval (passkey) fails although perplexity is fine. In a recall row
the second statement's digits can only be predicted by copying them from the first, so the teacher copies them
and the student is penalized unless its cache kept them.

A row is changed with probability `fraction` and only if it holds one document (no segment boundary); each of its
`facts` facts is inserted at a random place in the first `span` of the row's text (default the first half) and
restated at least `min_gap` tokens later; a span near 1 states facts near the end of a row too (tried at 2k tokens,
CR 8, to recover passkeys deep in a prompt: 40 steps found no more, README "Learned compression"). The row stays
seq_len tokens long: the text's tail is cut by what was inserted. Positions continue from the row's first
position. With `weight` > 1 every row (changed or not) also carries 'loss_weights' (float32 [T]): `weight` on the
restatements' tokens, 1 elsewhere; the training losses weigh each target token by it (data.packing.target_weights),
so the retrieval a recall row asks for is not ~1% of the loss. The templates are deliberately NOT the passkey
evaluation's (dmc_jax/evaluation/passkey.py: "The pass key is ... Remember it."): training never sees its wording.

Shape letters: T row length.
"""

from __future__ import annotations

import numpy as np

LABELS = ("locker", "account", "room", "order", "ticket", "batch", "serial", "invoice", "parcel", "gate",
          "flight", "badge", "cabinet", "vault", "permit", "license", "seat", "route", "project", "lot",
          "case", "file", "policy", "claim", "desk", "shelf", "unit", "member", "client", "voucher")
FACTS = ("\nNote: the {label} number is {num}.\n",
         "\n(Record: {label} code {num}.)\n",
         "\nFor later: {label} = {num}.\n",
         "\nThe {label} is number {num}, please note.\n")
RESTATE = ("\nAs noted before, the {label} number is {num}.",
           "\nThe {label} code was {num}.",
           "\nRecall that {label} = {num}.",
           "\nSo the {label} is number {num}.")


class RecallInserter:
    """grain random_map transform: row dict {'tokens', 'segment_ids', 'positions'} (int32 [T]) -> same shapes."""

    def __init__(self, tokenizer, fraction: float, facts: int, min_gap: int = 32, span: float = 0.5,
                 weight: float = 1.0):
        self.tokenizer = tokenizer
        self.fraction = float(fraction)
        self.facts = int(facts)
        self.min_gap = int(min_gap)
        self.span = float(span)
        self.weight = float(weight)

    def _unchanged(self, row: dict) -> dict:
        if self.weight == 1.0:
            return row
        return {**row, "loss_weights": np.ones(len(row["tokens"]), np.float32)}

    def fact_ids(self, rng: np.random.Generator) -> tuple[list, list]:
        """Token ids of one fact and of its restatement (same template index, so the wording pairs up)."""
        label = LABELS[rng.integers(len(LABELS))]
        digits = int(rng.integers(4, 7))
        num = int(rng.integers(10 ** (digits - 1), 10 ** digits))
        t = int(rng.integers(len(FACTS)))
        return (self.tokenizer.encode(FACTS[t].format(label=label, num=num)),
                self.tokenizer.encode(RESTATE[t].format(label=label, num=num)))

    def __call__(self, row: dict, rng: np.random.Generator) -> dict:
        segments_T = np.asarray(row["segment_ids"])
        if rng.random() >= self.fraction or segments_T[0] == 0 or (segments_T != segments_T[0]).any():
            return self._unchanged(row)
        tokens_T = np.asarray(row["tokens"])
        T = len(tokens_T)
        pairs = [self.fact_ids(rng) for _ in range(self.facts)]
        n_text = T - sum(len(f) + len(r) for f, r in pairs)
        if n_text < 2 * self.min_gap:
            return self._unchanged(row)
        inserts = []  # (text position, order, ids): everything at one position goes in order
        for i, (fact, restate) in enumerate(pairs):
            at = int(rng.integers(0, max(1, min(int(self.span * n_text), n_text - self.min_gap))))
            later = int(rng.integers(min(at + self.min_gap, n_text), n_text + 1))
            inserts += [(at, 2 * i, fact), (later, 2 * i + 1, restate)]
        out, restated, prev = [], [], 0  # restated: (start, end) of each restatement in out
        for at, order, ids in sorted(inserts, key=lambda x: (x[0], x[1])):
            out += tokens_T[prev:at].tolist()
            if order % 2:
                restated.append((len(out), len(out) + len(ids)))
            out += list(ids)
            prev = at
        out += tokens_T[prev:n_text].tolist()
        assert len(out) == T, (len(out), T)
        positions_T = np.asarray(row["positions"])
        new = {"tokens": np.asarray(out, np.int32), "segment_ids": segments_T.copy(),
               "positions": (positions_T[0] + np.arange(T)).astype(np.int32)}
        if self.weight != 1.0:
            weights_T = np.ones(T, np.float32)
            for start, end in restated:
                weights_T[start:end] = self.weight
            new["loss_weights"] = weights_T
        return new
