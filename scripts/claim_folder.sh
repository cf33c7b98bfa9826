# Sourced by the scripts that write a results folder: `claim_folder OUT NAME` refuses (exit 2) a
# non-empty OUT that the script NAME did not write, and marks OUT as that script's. A rerun into
# the script's own folder replaces what the script wrote there, and nothing else.
claim_folder() {  # claim_folder OUT NAME
    local out=$1 marker="$1/.llava_moslora_$2"
    if [ -e "$out" ] && [ ! -e "$marker" ] && [ -n "$(ls -A "$out")" ]; then
        echo "error: $out exists and was not written by this script; pass another folder as OUT" >&2
        exit 2
    fi
    mkdir -p "$out" && touch "$marker"
}
