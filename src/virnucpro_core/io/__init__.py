"""Files in and out: FASTA, nucleotide translation, id sets, atomic writes, embeddings tables, duplicate keys,
the parts' files."""
