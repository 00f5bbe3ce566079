"""The data-preparation helpers that a reader does not need in order to follow the path from
data to prediction: the Kaggle downloads and the local layouts users have (sources.py), the
seeded synthetic faces and sentences (synthetic.py), the audit of near-copies across splits
(leaks.py) and the training of the tokenizer (tokenizer.py). prepare_data.py imports them;
like the scripts, they import the root modules (data, images, runtime) by name, so they run
with the repository root on the path.
"""
