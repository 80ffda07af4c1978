"""Datasets users already have -> checked `Example`s in an ArrayRecord dataset, with a rejects
log and a report. The command line is `data_pipelines/convert.py`:

    python -m data_pipelines.convert --format=llava --json llava_v1_5_mix665k.json \\
        --image_root /data/llava/images --out /data/llava665k --num_processes=16
    python -m data_pipelines.convert --format=jsonl --jsonl chats.jsonl --out /data/text

One module per format, over one set of checks and one driver:

    llava.py        LLaVA JSON (streamed): convert_llava, read_llava (evaluation, in memory)
    chat_jsonl.py   text-only chat JSONL: convert_jsonl
    hf.py           Hugging Face datasets (save_to_disk / parquet, read locally): convert_hf
    webdataset.py   WebDataset tar shards: convert_webdataset
    checks.py       record / turn / image / path checks, REASONS and ADJUSTMENTS, record identity
                    (ids made unique, byte-identical repeats rejected): what every format shares
    driver.py       the streamed, N-process, chunk-committed, resumable conversion of a format's
                    `Reader`: rejects.jsonl, ConversionReport, manifest, atomic commits

Every format goes through the same checks, reasons and report: a record converted from a
Hugging Face dataset or a WebDataset sample is the record its LLaVA JSON would give. Example:

    from data_pipelines.conversion import convert_llava
    report = convert_llava("mix665k.json", "/data/images", "/data/mix665k", num_processes=16)
    print(report.summary())  # total / written / rejected per reason; out/rejects.jsonl names each
"""
from data_pipelines.conversion.chat_jsonl import convert_jsonl
from data_pipelines.conversion.checks import ADJUSTMENTS, REASONS, ImagePolicy
from data_pipelines.conversion.driver import CHUNK_SIZE, REJECTS_FILE, ConversionError, ConversionReport
from data_pipelines.conversion.hf import HFLayout, convert_hf, detect_hf_layout, open_hf_dataset
from data_pipelines.conversion.llava import convert_llava, read_llava
from data_pipelines.conversion.webdataset import WDS_IMAGE_EXTENSIONS, convert_webdataset

__all__ = ["ADJUSTMENTS", "CHUNK_SIZE", "REASONS", "REJECTS_FILE", "WDS_IMAGE_EXTENSIONS", "ConversionError",
           "ConversionReport", "HFLayout", "ImagePolicy", "convert_hf", "convert_jsonl", "convert_llava",
           "convert_webdataset", "detect_hf_layout", "open_hf_dataset", "read_llava"]
