"""Models on disk -> components: loading, single-file conversion, hashes, errors, shipped configs."""
