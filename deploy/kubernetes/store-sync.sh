#!/bin/sh
# store-sync.sh SOURCE DEST [ROUTING]: copies a published model store (SOURCE, read-only)
# into the gateway's store (DEST). Whatever the gateway's poller may see is complete:
#   - a model new to DEST is assembled in a temporary folder, then renamed into place;
#   - a version new to an existing model likewise (versions are immutable: publish a new
#     number rather than rewriting one);
#   - a changed file (config.pbtxt, routing.toml) is written beside and renamed over.
# Only numbered version folders and model-level files are copied: temporary names
# (.name, name.partial, name.tmp, 3.new ...) are skipped, and this script's own temporary
# folders (.sync-*) left by an interrupted run are removed first. ROUTING, when given,
# holds <model>.routing.toml files, placed as DEST/<model>/routing.toml.
set -eu
SOURCE="${1:?usage: store-sync.sh SOURCE DEST [ROUTING]}"
DEST="${2:?usage: store-sync.sh SOURCE DEST [ROUTING]}"
ROUTING="${3:-}"
TMP=".sync-$$"

place() {  # place FILE TARGET: copy when different, by rename
  if ! cmp -s "$1" "$2"; then
    temporary="$(dirname "$2")/$TMP-$(basename "$2")"
    cp "$1" "$temporary" && mv -f "$temporary" "$2"
  fi
}

is_version() {  # a version folder's name: digits only, no leading zero
  case "$1" in ''|*[!0-9]*|0?*) return 1 ;; *) return 0 ;; esac
}

is_model() {  # a model folder's name, not a temporary one
  case "$1" in .*|*.partial|*.tmp|*.new|*.old) return 1 ;; *) return 0 ;; esac
}

sync_model() {  # sync_model SOURCE_MODEL DEST_MODEL (DEST_MODEL exists)
  # sh has no local variables: these names are this function's alone.
  for entry in "$1"/*; do
    [ -e "$entry" ] || continue
    entry_name="$(basename "$entry")"
    if [ -d "$entry" ]; then
      is_version "$entry_name" || continue
      [ -d "$2/$entry_name" ] && continue
      cp -R "$entry" "$2/$TMP-$entry_name"
      mv "$2/$TMP-$entry_name" "$2/$entry_name"
    elif [ -f "$entry" ] && is_model "$entry_name"; then
      place "$entry" "$2/$entry_name"
    fi
  done
}

mkdir -p "$DEST"
find "$DEST" -mindepth 1 -maxdepth 2 -name '.sync-*' -exec rm -rf {} +
for model in "$SOURCE"/*; do
  [ -d "$model" ] || continue
  name="$(basename "$model")"
  is_model "$name" || continue
  if [ -d "$DEST/$name" ]; then
    sync_model "$model" "$DEST/$name"
  else
    mkdir "$DEST/$TMP-$name"
    sync_model "$model" "$DEST/$TMP-$name"
    if [ -n "$ROUTING" ] && [ -f "$ROUTING/$name.routing.toml" ]; then
      cp "$ROUTING/$name.routing.toml" "$DEST/$TMP-$name/routing.toml"
    fi
    mv "$DEST/$TMP-$name" "$DEST/$name"
  fi
done
if [ -n "$ROUTING" ]; then
  for file in "$ROUTING"/*.routing.toml; do
    [ -e "$file" ] || continue
    name="$(basename "$file" .routing.toml)"
    [ -d "$DEST/$name" ] && place "$file" "$DEST/$name/routing.toml"
  done
fi
exit 0
