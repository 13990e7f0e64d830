"""
Corpus -> activations, warm-start explanations and document-disjoint splits.

    python datagen.py config/datagen_smollm2.py
    python datagen.py config/datagen_tiny.py --base_model=DIR --corpus=FILE

For each document, `positions_per_doc` token positions at or after `min_position` are drawn from a
per-document seeded RNG. The activation is the output of block `layer` there (the forward stops after
that block), and the context is the decoded prefix through that token. Documents (a repeated text
is dropped), never rows, are split into av_sft / ar_sft / rl / val; documents that open alike and near-duplicates
go to one split, and with `group_column` (say a book) so do all the documents of a group. Writes
out_dir/{av_sft,ar_sft,rl,val}.parquet and out_dir/meta.json at the end, each file renamed into place,
meta.json last: a crash or bad input leaves no half-written file, and no meta.json beside a mix of splits.
"""
import collections
import hashlib
import http.client
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import configurator
import nla

# -----------------------------------------------------------------------------
# I/O
base_model = 'HuggingFaceTB/SmolLM2-135M-Instruct'  # hub id or local folder
corpus = 'data/corpus.parquet'  # .parquet (a `text` column), .jsonl ({"text": ...}), .txt (blank-line separated), or hf://OWNER/REPO/FILE.parquet
out_dir = 'data/smollm2_l20'
max_docs = 0  # the first max_docs distinct texts (a parquet or .jsonl is read only that far); 0: every one
group_column = ''  # a corpus column (e.g. 'source': one book) whose documents all go to one split; '' = each alone
near_duplicate = 0.5  # two documents sharing this fraction of the smaller one's 13-token runs (of the tokens read) go to one split; 0: off
# positions
layer = 20  # activation = output of block `layer` = hidden_states[layer + 1] (the last block's: before the final norm)
positions_per_doc = 8
min_position = 50  # positions are drawn at or after this token index
max_length = 256  # tokens read per document, so contexts are at most this long
splits = {'av_sft': 0.3, 'ar_sft': 0.3, 'rl': 0.3, 'val': 0.1}  # fractions of the documents
marker = '@'  # the AV prompt token whose input embedding the activation replaces
# teacher
teacher = 'context'  # 'context' (offline, deterministic) or 'api' (an OpenAI-compatible endpoint)
api_base_url = 'https://api.openai.com/v1'
api_model = 'gpt-4o-mini'
api_key_env = 'OPENAI_API_KEY'  # the name of the environment variable holding the key
api_concurrency = 8
api_retries = 5
# system
seed = 1337
device = 'auto'  # 'auto', 'cpu', 'cuda', 'cuda:1', ...
dtype = 'bfloat16'  # 'float32', 'bfloat16' or 'float16'
batch_size = 32  # documents per forward pass
# -----------------------------------------------------------------------------

API_INSTRUCTION = (
    "Below is the beginning of a text, cut at the token where a language model must predict what comes next. "
    "Name the 2-3 features of the text that a model would use to predict the next words (for example the "
    "last words, an open clause or quotation, the topic, the style). Write about 80-100 words, as 2-3 short "
    "snippets, inside <explanation></explanation> tags.\n\n<text>{context}</text>")


def fail(msg):
    raise SystemExit(f"datagen: {msg}")


_progress_printed = 0.0  # when progress() last wrote a line to a log


def progress(done, total, t0, what):
    """The rate and ETA: on a terminal one self-overwriting line; in a log a line every 30 s and at the end."""
    global _progress_printed
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0
    line = f"{what} {done}/{total} | {rate:.1f}/s | eta {eta:.0f}s"
    if sys.stderr.isatty():
        print(f"\r{line} ", end='\n' if done == total else '', file=sys.stderr, flush=True)
    elif done == total or time.time() - _progress_printed >= 30:
        _progress_printed = time.time()
        print(line, file=sys.stderr, flush=True)


def read_corpus(path, group_column='', max_docs=0):
    """The corpus's distinct texts from a local file or an hf:// parquet: each one's text, its group as a string (its
    group_column value, or without a group_column its own place in the file) and its row in the file (from 0; a
    .jsonl's line less one; a .txt's text, counted by blank lines), all of its first occurrence; and how many repeats
    were dropped (a text the corpus holds twice is one document, or it could land in two splits). Given max_docs, the
    file ends, for every format, at the text that makes max_docs distinct ones, and a parquet or .jsonl is read no
    further (a hub shard holds far more than a small run uses)."""
    first = {}  # each distinct non-empty text: its first row

    def taken(texts, start):
        """How many of texts, at rows start.., the corpus keeps."""
        for i, t in enumerate(texts):
            if isinstance(t, str) and t.strip() and t not in first:
                first[t] = start + i
                if len(first) == max_docs:
                    return i + 1
        return len(texts)

    if path.startswith('hf://'):
        from huggingface_hub import hf_hub_download
        parts = path[len('hf://'):].split('/', 2)
        if len(parts) != 3 or not all(parts):
            fail(f"corpus '{path}' must look like hf://OWNER/REPO/FILE.parquet")
        try:
            path = hf_hub_download(f"{parts[0]}/{parts[1]}", parts[2], repo_type='dataset')
        except (OSError, ValueError) as e:  # the hub's errors: not found, offline (OSErrors), a malformed repo id
            fail(f"corpus '{path}' could not be downloaded ({type(e).__name__})")
    if os.path.isdir(path):
        fail(f"corpus '{path}' is a folder, not a file")
    if not os.path.isfile(path):
        fail(f"corpus '{path}' not found")
    try:  # ArrowInvalid, JSONDecodeError and UnicodeDecodeError are all ValueErrors
        if path.endswith('.parquet'):
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            if 'text' not in names:
                fail(f"corpus '{path}' has no 'text' column (columns: {names})")
            if group_column and group_column not in names:
                fail(f"corpus '{path}' has no '{group_column}' column (group_column; columns: {names})")
            docs, groups = [], []
            for batch in parquet.iter_batches(1024, columns=['text'] + ([group_column] if group_column not in ('', 'text') else [])):
                texts = batch.column('text').to_pylist()
                n = taken(texts, len(docs))
                groups += batch.column(group_column).to_pylist()[:n] if group_column else range(len(docs), len(docs) + n)
                docs += texts[:n]
                if 0 < max_docs == len(first):
                    break
        elif path.endswith('.jsonl'):
            docs, groups = [], []
            with open(path, encoding='utf-8-sig') as f:  # -sig: a leading byte-order mark is not text
                for n, line in enumerate(f, 1):
                    try:
                        obj = json.loads(line) if line.strip() else {'text': None, group_column: None}
                        if isinstance(obj['text'], str):
                            obj['text'].encode()  # JSON takes a lone surrogate escape ("\ud83d"), which is not text
                        docs.append(obj['text'])
                        groups.append(obj[group_column] if group_column else n)
                    except UnicodeEncodeError:
                        fail(f"corpus '{path}' line {n}: its text holds a lone surrogate escape (a cut emoji?), which is not UTF-8")
                    except (ValueError, KeyError, TypeError):
                        fail(f"corpus '{path}' line {n} is not a JSON object with a 'text' key"
                             + (f" and a '{group_column}' key (group_column)" if group_column else ''))
                    taken(docs[-1:], len(docs) - 1)
                    if 0 < max_docs == len(first):
                        break
        elif path.endswith('.txt'):
            if group_column:
                fail(f"corpus '{path}' is a .txt, which has no columns: group_column must be ''")
            with open(path, encoding='utf-8-sig') as f:
                docs = re.split(r'\n\s*\n', f.read())  # a blank line may hold spaces
            docs = docs[:taken(docs, 0)]
            groups = list(range(len(docs)))
        else:
            fail(f"corpus '{path}' must be .parquet, .jsonl or .txt")
    except (OSError, ValueError) as e:  # OSError: a parquet damaged past its footer
        fail(f"corpus '{path}' cannot be read: {nla.first_line(e)}")
    bad = [i for i, d in enumerate(docs) if not isinstance(d, (str, type(None)))]
    if bad:
        fail(f"corpus '{path}': document {bad[0]} is {type(docs[bad[0]]).__name__}, not a string ({len(bad)} such)")
    keep = [i for i, d in enumerate(docs) if d and d.strip()]
    if not keep:
        fail(f"corpus '{path}' has no documents")
    if len(keep) < len(docs):
        print(f"corpus: {len(docs) - len(keep)} empty or null texts skipped", file=sys.stderr)
    missing = [i for i in keep if groups[i] is None or groups[i] != groups[i]]  # NaN: pandas' missing value
    if missing:
        fail(f"corpus '{path}': document {missing[0]} has no '{group_column}' (group_column; {len(missing)} such)")
    rows = list(first.values())
    return list(first), [str(groups[i]) for i in rows], rows, len(keep) - len(first)


def draw_positions(ids, special, text, seed, positions_per_doc, min_position, ends_a_character):
    """Sorted positions >= min_position on non-special tokens that end a character, from an RNG seeded by seed and the
    document's text: a document gets the same positions whatever else the corpus holds (and an api teacher's cache
    still serves them)."""
    candidates = [p for p in range(min_position, len(ids)) if ids[p] not in special]
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'little')])
    drawn = (p for p in rng.permutation(candidates).tolist() if ends_a_character(p))
    return sorted(itertools.islice(drawn, positions_per_doc))


RUN_TOKENS = 13  # the length of the token runs that near-duplicates and the val-overlap line compare


def token_runs(ids, n=RUN_TOKENS):
    """The hashes of a document's runs of n tokens (a hash of ints is the same in every process, unlike a str's)."""
    return {hash(tuple(ids[i:i + n])) for i in range(len(ids) - n + 1)}


def near_duplicate_pairs(runs, overlap, holders_kept=8):
    """(i, j), j < i, for any two documents that share at least `overlap` of the smaller one's token_runs. A run is
    looked up among the first holders_kept documents that hold it, which bounds the work on boilerplate that many
    documents share."""
    holders = {}
    for i, mine in enumerate(runs):
        for j, shared in collections.Counter(j for run in mine for j in holders.get(run, ())).items():
            if shared >= overlap * min(len(mine), len(runs[j])):
                yield i, j
        for run in mine:
            if len(holders.setdefault(run, [])) < holders_kept:
                holders[run].append(i)


def same_opening_pairs(docs_ids, n):
    """(i, j), j < i, for documents whose first n tokens are the same: the rows of either at a position below n
    are the other's rows too (a context and its activation depend only on the tokens through their position)."""
    first = {}
    for i, ids in enumerate(docs_ids):
        j = first.setdefault(tuple(ids[:n]), i)
        if j != i:
            yield i, j


def join_groups(groups, pairs):
    """The groups of documents, with those of each pair (i, j) joined under j's label (union-find), and the number
    of joins made."""
    parent = {g: g for g in groups}

    def root(g):
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    joins = 0
    for i, j in pairs:
        a, b = root(groups[i]), root(groups[j])
        if a != b:
            parent[a] = b
            joins += 1
    return [root(g) for g in groups], joins


@torch.no_grad()
def activations(backbone, docs_ids, doc_positions, pad_id, batch_size, device):
    """(rows, d) float32: block-K outputs at every (doc, position), documents batched and right-padded."""
    out, t0 = [], time.time()
    for i in range(0, len(docs_ids), batch_size):
        chunk = docs_ids[i:i + batch_size]
        ids, mask = nla.pad_right(chunk, pad_id, device)
        h = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d)
        for j in range(len(chunk)):
            out.append(h[j, doc_positions[i + j]].float().cpu())
        progress(min(i + batch_size, len(docs_ids)), len(docs_ids), t0, 'activations (docs)')
    return torch.cat(out).numpy()


def context_explanation(context):
    """The offline teacher: the context's most salient earlier words, then a quote of its last words."""
    words = context.split()
    last = ' '.join(words[-6:]).replace('</explanation>', '</ explanation>')  # a quoted closing tag would end it early
    earlier = {w.strip('.,;:!?"\'()[]').lower() for w in words[:-6]}
    salient = sorted((w for w in earlier if w.isalpha()), key=lambda w: (-len(w), w))[:3]
    lines = ([f"- earlier words: {', '.join(salient)}"] if salient else []) + [f'- ends with: "{last}"']
    return "<explanation>\n" + "\n".join(lines) + "\n</explanation>"


def api_call(context, api_key, stop):
    """One chat completion with retries and exponential backoff on rate limits, server errors, timeouts, dropped
    connections and answers that are not HTTP; None once `stop` is set (the run is ending: no more tries)."""
    body = json.dumps({'model': api_model, 'temperature': 0,
                       'messages': [{'role': 'user', 'content': API_INSTRUCTION.format(context=context)}]}).encode()
    request = urllib.request.Request(f"{api_base_url.rstrip('/')}/chat/completions", data=body, headers={
        'Content-Type': 'application/json', 'Authorization': f"Bearer {api_key}"})
    for attempt in range(api_retries + 1):
        if stop.is_set():
            return None
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = response.read()
            try:
                text = json.loads(answer)['choices'][0]['message']['content']
            except (ValueError, KeyError, IndexError, TypeError):
                text = None
            if not isinstance(text, str):
                fail(f"teacher api: {api_base_url} answered with no chat completion text: {answer[:200]!r}")
            return text
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500 or attempt == api_retries:
                fail(f"teacher api: HTTP {e.code} from {api_base_url}: {e.read()[:200]!r}")
        except (OSError, http.client.HTTPException) as e:  # unreachable, dropped, timed out, cut, not HTTP at all
            if attempt == api_retries:
                fail(f"teacher api: {api_base_url} unreachable after {api_retries + 1} tries: {e}")
        stop.wait(2 ** attempt)


def api_explanations(contexts, cache_path):
    """Explanations from the api teacher, with an on-disk cache keyed by endpoint, model, instruction and context, so an
    interrupted run resumes without paying twice (two servers may give one name to different models)."""
    api_key = os.environ[api_key_env]  # checked by main() before any work
    endpoint = api_base_url.rstrip('/')
    key = lambda c: hashlib.sha256(f"{endpoint}\n{api_model}\n{API_INSTRUCTION}\n{c}".encode()).hexdigest()
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path, 'rb+') as f:
            *lines, cut = f.read().split(b'\n')
            f.truncate(f.tell() - len(cut))  # a line cut by a crash goes, so appends start on a line of their own
        for n, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                cache[entry['key']] = entry['explanation']
            except (ValueError, KeyError, TypeError):
                fail(f"teacher cache '{cache_path}' line {n} is not a cache entry: delete that line or the file")
    todo = sorted({c for c in contexts if key(c) not in cache})
    lock, t0, done, stop = threading.Lock(), time.time(), [0], threading.Event()

    def work(c):
        try:
            text = api_call(c, api_key, stop)
        except BaseException:  # a request failed for good: the others make no further tries
            stop.set()
            raise
        if text is None:
            return
        with lock, open(cache_path, 'a') as f:
            f.write(json.dumps({'key': key(c), 'explanation': text}) + '\n')
            cache[key(c)] = text
            done[0] += 1
            progress(done[0], len(todo), t0, 'teacher api')

    print(f"teacher api: {len(contexts) - len(todo)} cached, {len(todo)} to ask", file=sys.stderr)
    with ThreadPoolExecutor(api_concurrency) as pool:
        try:
            list(pool.map(work, todo))
        except BaseException:  # a failed request, Ctrl-C or SIGTERM: the queued contexts are dropped, and the
            stop.set()  # requests in flight make no further tries (one already sent ends within its 120 s timeout)
            raise
    return [as_explanation(cache[key(c)]) for c in contexts]


def as_explanation(answer):
    """The teacher's explanation alone, in its tags: a preamble, a reasoning block or chatter after it would become
    the verbalizer's target. An answer without both tags (cut short by a token limit?) is taken whole, less any tag."""
    inner = nla.extract_explanation(answer)
    return f"<explanation>{re.sub(r'</?explanation>', '', answer).strip() if inner is None else inner}</explanation>"


def main(config):
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in splits.values())
    fractions = numbers and all(v >= 0 for v in splits.values()) and abs(sum(splits.values()) - 1) <= 1e-6  # NaN fails
    if set(splits) != set(nla.SPLITS) or not fractions:
        fail(f"splits must give fractions of {nla.SPLITS} summing to 1, got {splits}")
    if splits['val'] == 0:
        fail("splits['val'] is 0, but every stage of train.py evaluates on val")
    if not 0 <= seed < 2**32:  # numpy's seeds
        fail(f"seed must be in [0, 2**32), got {seed}")
    for name, low in (('batch_size', 1), ('positions_per_doc', 1), ('max_docs', 0), ('min_position', 0),
                      ('api_concurrency', 1), ('api_retries', 0)):
        if config[name] < low:
            fail(f"{name} must be >= {low}, got {config[name]}")
    if not 0 <= near_duplicate <= 1:
        fail(f"near_duplicate must be in [0, 1], got {near_duplicate}")
    if min_position >= max_length:
        fail(f"min_position={min_position} must be below max_length={max_length}, or no document has a position")
    if teacher not in ('context', 'api'):
        fail(f"teacher must be 'context' or 'api', got '{teacher}'")
    if teacher == 'api':
        if not os.environ.get(api_key_env):
            fail(f"teacher='api' needs the key in the environment variable {api_key_env}, which is not set")
        if not api_base_url.startswith(('http://', 'https://')):
            fail(f"api_base_url must start with http:// or https://, got '{api_base_url}'")
        if re.search(r'[\x00-\x20\x7f]', api_base_url):  # http.client refuses it, but only at the first request
            fail(f"api_base_url {api_base_url!r} is not a valid URL: it holds a space or a control character")
        try:  # a port that is not a number fails here, not at the first request
            urllib.parse.urlsplit(api_base_url).port
        except ValueError as e:
            fail(f"api_base_url '{api_base_url}': {e}")
    written = [nla.split_path(out_dir, split) for split in nla.SPLITS] + [os.path.join(out_dir, 'meta.json')]
    if os.path.isfile(corpus) and any(os.path.isfile(path) and os.path.samefile(corpus, path) for path in written):
        fail(f"corpus '{corpus}' is a file that datagen would write over in out_dir '{out_dir}': choose another out_dir")
    try:  # an out_dir that cannot be made, a bad device, dtype, model, marker or layer fails here, before any work
        nla.check_out_dir(out_dir)
        run_device = nla.resolve_device(device)
        nla.torch_dtype(dtype)
        tokenizer = nla.load_tokenizer(base_model)
        signature = nla.model_signature(base_model, tokenizer)
        nla.check_layer(base_model, layer, signature['n_layers'])
        prompt_ids, marker_pos = nla.av_prompt(tokenizer, marker)
        texts, groups, doc_ids, repeats = read_corpus(corpus, group_column, max_docs)  # read before the model loads, which can take minutes
        backbone = nla.load_backbone(base_model, layer + 1, dtype, run_device)
    except ValueError as e:
        fail(str(e))
    d_model = signature['d_model']

    # positions per document; short documents are skipped and counted
    special = set(tokenizer.all_special_ids)
    docs_ids, doc_positions, kept, kept_groups = [], [], [], []
    for text, group, doc_id in zip(texts, groups, doc_ids):  # a document's id is its row in the corpus
        ids = nla.encode_text(tokenizer, text, add_special_tokens=True, truncation=True, max_length=max_length)
        # a byte-level token can end inside a character of several bytes: its context would end in U+FFFD (no
        # character takes more than 4 tokens, so decoding the last 4 shows it)
        positions = draw_positions(ids, special, text, seed, positions_per_doc, min_position,
                                   lambda p: not tokenizer.decode(ids[max(0, p - 3):p + 1]).endswith('\ufffd'))
        if positions:
            docs_ids.append(ids)
            doc_positions.append(positions)
            kept.append(doc_id)
            kept_groups.append(group)
    skipped = len(texts) - len(kept)
    print(f"{len(texts)} documents ({repeats} repeats of earlier texts dropped from the corpus): {len(kept)} used, "
          f"{skipped} skipped as having no position to draw (a token at min_position={min_position} or after, not special, "
          "that ends a character)",
          file=sys.stderr)

    # documents, never rows, are split. A document's group is its group_column value (or itself alone), and
    # documents that open alike and near-duplicates join their groups; a group goes whole to the split where it
    # starts when the groups are laid end to end in a seeded order
    runs = [token_runs(ids) for ids in docs_ids]
    # a row is drawn at min_position or after: documents that open alike up to there can give the very same rows
    kept_groups, joins = join_groups(kept_groups, same_opening_pairs(docs_ids, min_position + 1))
    print(f"documents opening with the same {min_position + 1} tokens: joined {joins} pairs of groups", file=sys.stderr)
    if near_duplicate > 0:  # near-duplicates in two splits would leak as a repeated text would
        kept_groups, joins = join_groups(kept_groups, near_duplicate_pairs(runs, near_duplicate))
        print(f"near-duplicates (documents sharing >= {near_duplicate:.0%} of their {RUN_TOKENS}-token runs) "
              f"joined {joins} pairs of groups", file=sys.stderr)
    members = {}
    for doc_id, group in zip(kept, kept_groups):
        members.setdefault(group, []).append(doc_id)
    order = np.random.default_rng(seed).permutation(len(members))
    ends = np.cumsum([0] + [splits[s] for s in nla.SPLITS])
    bounds = np.round(ends / ends[-1] * len(kept)).astype(int)  # fractions within 1e-6 of 1 still place every document
    group_docs = list(members.values())
    doc_split, start = {}, 0
    for i in order:
        s = nla.SPLITS[np.searchsorted(bounds, start, side='right') - 1]
        doc_split.update(dict.fromkeys(group_docs[i], s))
        start += len(group_docs[i])
    for s in nla.SPLITS:
        if splits[s] > 0 and s not in doc_split.values():
            fail(f"split '{s}' got no document: {len(kept)} usable documents in {len(members)} groups (each goes to one "
                 f"split; joined as said above) are too few for splits={splits}")
    if group_column:
        print(f"{len(members)} groups by '{group_column}' (after the joins above), each one's documents in one split", file=sys.stderr)
    in_training = set().union(*(r for doc_id, r in zip(kept, runs) if doc_split[doc_id] != 'val'))
    shares = [len(r & in_training) / max(len(r), 1) for doc_id, r in zip(kept, runs) if doc_split[doc_id] == 'val']
    print(f"val documents with at least half of their {RUN_TOKENS}-token runs in training documents: "
          f"{sum(x >= 0.5 for x in shares)} of {len(shares)}", file=sys.stderr)

    acts = activations(backbone, docs_ids, doc_positions, tokenizer.pad_token_id, batch_size, run_device)
    rows = [(doc_id, p, s) for doc_id, positions in zip(kept, doc_positions) for p in positions
            for s in [doc_split[doc_id]]]
    bad = nla.unusable_rows(acts)  # what read_split refuses
    if len(bad):
        doc_id, p, _ = rows[bad[0]]
        fail(f"{len(bad)} activations are NaN, inf or all zero, the first at row {bad[0]} (doc_id {doc_id}, position {p}); "
             "nothing written")
    token_ids = {doc_id: ids for doc_id, ids in zip(kept, docs_ids)}
    contexts = [tokenizer.decode(token_ids[doc_id][:p + 1], skip_special_tokens=True) for doc_id, p, _ in rows]

    # warm-start explanations for every split but rl
    needs = [i for i, (_, _, s) in enumerate(rows) if s != 'rl']
    if teacher == 'context':
        taught = [context_explanation(contexts[i]) for i in needs]
    else:
        os.makedirs(out_dir, exist_ok=True)
        taught = api_explanations([contexts[i] for i in needs], os.path.join(out_dir, 'teacher_cache.jsonl'))
    explanations = [''] * len(rows)
    for i, text in zip(needs, taught):
        explanations[i] = text

    norms = np.linalg.norm(acts, axis=1)
    quantiles = {f"q{q:02d}": float(np.percentile(norms, q)) for q in (5, 25, 50, 75, 95)}
    tables, counts = {}, {}
    for s in nla.SPLITS:
        idx = [i for i, r in enumerate(rows) if r[2] == s]
        counts[s] = len(idx)
        tables[s] = pa.table({
            'doc_id': pa.array([rows[i][0] for i in idx], pa.int64()),
            'position': pa.array([rows[i][1] for i in idx], pa.int32()),
            'context': pa.array([contexts[i] for i in idx], pa.string()),
            'activation': pa.FixedSizeListArray.from_arrays(pa.array(acts[idx].reshape(-1), pa.float32()), d_model),
            'explanation': pa.array([explanations[i] for i in idx], pa.string()),
        })
    meta = {
        'base_model': base_model, 'layer': layer, **signature, 'vocab_size': len(tokenizer),
        'marker': marker, 'marker_id': prompt_ids[marker_pos],
        'alpha': quantiles['q75'],  # the paper's injection scale: the 75th percentile of activation norms
        'norm_quantiles': quantiles, 'teacher': teacher,
        'av_prompt': nla.AV_USER, 'ar_prompt': nla.AR_TEMPLATE,
        'rows': counts, 'docs': {s: sum(v == s for v in doc_split.values()) for s in nla.SPLITS},
        'docs_skipped': skipped, 'docs_repeated': repeats, 'config': config,
    }
    try:  # the data this replaces, to say so
        with open(os.path.join(out_dir, 'meta.json')) as f:
            old_id = json.load(f).get('data_id', 'of an older datagen.py')
    except (OSError, ValueError, AttributeError):
        old_id = None
    data_id = nla.write_data(out_dir, tables, meta)
    if old_id not in (None, data_id):
        print(f"datagen: note: replaced data {old_id} in {out_dir}: runs made on it cannot resume here", file=sys.stderr)
    print(f"wrote {out_dir}: rows {counts} | alpha {meta['alpha']:.1f} | d_model {d_model} | data_id {data_id}")


if __name__ == '__main__':
    config = configurator.configure(globals())
    print(json.dumps(config))
    nla.on_stop_signals(lambda number, _: fail(f"stopped by {signal.Signals(number).name}"))  # one line; temporary files removed
    missing = nla.missing_folders(out_dir)
    try:
        main(config)
    finally:
        for folder in missing:  # a run stopped before writing anything leaves no empty folder it made
            if os.path.isdir(folder):
                if os.listdir(folder):
                    break
                os.rmdir(folder)
