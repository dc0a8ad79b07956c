"""The Extism host: module inspection, codecs, instance pools, host functions, plugin logs."""
