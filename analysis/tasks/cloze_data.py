"""The documents of the local `cloze` task (cloze.yaml), loaded by lm-eval through `custom_dataset`."""
from datasets import Dataset, DatasetDict

from analysis.zeroshot import cloze_docs


def dataset(**_metadata) -> DatasetDict:
    """lm-eval passes the task's metadata as keyword arguments; the documents do not depend on it."""
    return DatasetDict({"test": Dataset.from_list(cloze_docs())})
