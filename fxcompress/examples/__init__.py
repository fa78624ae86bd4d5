"""Small, self-contained examples that run anywhere without downloads.

:mod:`fxcompress.examples.digits` trains small CNNs on scikit-learn's bundled
8x8 digits images in a few seconds on a CPU: the model behind ``fxcompress
demo``, the tutorials and the benchmarks that need a real task metric.
:mod:`fxcompress.examples.bert` is a BERT-style encoder written out like Hugging
Face's ``BertLayer`` (symbolic tracing captures it), for the transformer benchmarks.
"""

from fxcompress.examples.bert import BertConfig, BertStyleEncoder, bert_inputs

from fxcompress.examples.digits import (
    DigitsCNN,
    DigitsData,
    DigitsResNet,
    accuracy,
    load_digits_data,
    pretrained_digits_cnn,
    pretrained_digits_resnet,
    train,
)

__all__ = [
    "BertConfig",
    "BertStyleEncoder",
    "bert_inputs",
    "BertConfig",
    "BertStyleEncoder",
    "bert_inputs",
    "DigitsCNN",
    "DigitsData",
    "DigitsResNet",
    "accuracy",
    "load_digits_data",
    "pretrained_digits_cnn",
    "pretrained_digits_resnet",
    "train",
]
