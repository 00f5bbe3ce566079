"""Training the tokenizer: a WordPiece vocabulary learned from the train texts alone, the same
for the same texts in every process.

    from prep.tokenizer import train_tokenizer
    tokenizer_json = train_tokenizer(train_texts, vocab_size=5000)["json"]

prepare_data.py trains it once and saves it as tokenizer.json; data.py loads that file and
encodes sentences with it (encode_texts), and every checkpoint carries a copy of its JSON.
"""
import heapq
from collections import Counter, defaultdict


def learn_word_pieces(word_counts, size):
    """The word pieces that BPE merges learn from word counts, with '##' marking a piece inside
    a word, as the WordPiece trainer of `tokenizers` does. That trainer breaks ties between
    equally frequent pairs (and numbers its tokens) in hash-map order, which changes from
    process to process: the same texts gave different vocabularies, and so different shards.
    Here the most frequent pair wins and a tie goes to the smaller pair, so the vocabulary
    depends on the texts alone."""
    words = sorted(word_counts)
    freq = [word_counts[word] for word in words]
    words = [[word[0]] + ["##" + char for char in word[1:]] for word in words]
    vocab = sorted({piece for word in words for piece in word})  # every character is kept
    known = set(vocab)
    # the count of each adjacent pair, and the words that hold it
    pairs = Counter()
    where = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    while len(vocab) < size and heap:
        count, pair = heapq.heappop(heap)
        if -count != pairs.get(pair):
            # a stale heap entry: this pair's count changed since it was pushed
            continue
        merged = pair[0] + pair[1][2:]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed = set()
        for i in where.pop(pair):  # only the words holding the pair change
            old = words[i]
            new = []
            j = 0
            while j < len(old):
                if tuple(old[j:j + 2]) == pair:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for p in zip(old, old[1:]):
                pairs[p] -= freq[i]
            for p in zip(new, new[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
            changed.update(zip(old, old[1:]), zip(new, new[1:]))
            words[i] = new
        del pairs[pair]
        for p in changed:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], p))
    return vocab


def train_tokenizer(train_texts, vocab_size):
    """A lowercase WordPiece tokenizer trained on the train texts only: val and test words that
    it never saw become [UNK] or word pieces, as they would in a new user's sentence. Returns
    {"json": the tokenizer as a JSON string}."""
    # imported here for start-up time: only this step of prepare_data.py needs it
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Texts are whitespace-normalized already, so each distinct chunk is normalized and
    # split once, not once per occurrence (ten times faster on the real data).
    chunks = Counter(chunk for text in train_texts for chunk in text.split())
    word_counts = Counter()
    for chunk, n in chunks.items():
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(chunk)):
            word_counts[word] += n
    vocab = ["[PAD]", "[UNK]"] + learn_word_pieces(word_counts, vocab_size - 2)  # [PAD] = 0
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    return {"json": tokenizer.to_str()}
