"""Notebook-first, reproducible LoRA/QLoRA adapter fine-tuning with verifiable provenance.

Modules:

- `adapterlab.data`: Read training and eval records, validate them line by line, normalise them to one shape with an explicit weight, deduplicate, split, measure, and hand TRL prompt/completion datasets with a weighted sampler.
- `adapterlab.formats`: One record, from the bytes of a line to a normalised `Example`: each format researchers bring recognised, validated field by field, and every problem reported in one `FILE:LINE: field: problem` line.
- `adapterlab.heads`: LoRA on an encoder with task heads (classification, regression, a fixed-size multi-output head), guarded against every bug in the fix log of the pipeline this path comes from.
- `adapterlab.queue`: Weighted feedback appended safely to a JSONL queue; at a threshold, an adapter trained in the background; the consumed feedback archived only once the new artifact has verified.
- `adapterlab.readers`: Whole sources into validated examples: JSON Lines line by line, every other file type, saved folders and hub datasets through `datasets`, a ChromaDB collection; token lengths after the chat template.
- `adapterlab.regressions`: Every past pipeline bug as a check on real code: reproduce the original failure, then show adapterlab's path survives the same inputs, and that removing its guard brings the failure back."""

__version__ = "0.1.0"
