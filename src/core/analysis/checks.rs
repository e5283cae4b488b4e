//! `fledge.dev/analysis`: the YAML list of named checks, parsed and checked.
