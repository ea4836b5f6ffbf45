from lmtune.data.readers import Example, read_examples
from lmtune.data.splits import stratified_split

__all__ = ["Example", "read_examples", "stratified_split"]
