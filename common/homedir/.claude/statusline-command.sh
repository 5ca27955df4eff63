#!/bin/bash
# Claude Code status line: workspace, branch and model, from the JSON on stdin.
input=$(cat)
dir=$(printf '%s' "$input" | jq -r '.workspace.current_dir // .cwd // empty')
model=$(printf '%s' "$input" | jq -r '.model.display_name // empty')
branch=$(git -C "${dir:-.}" symbolic-ref --short -q HEAD 2>/dev/null)
dirty=$(git -C "${dir:-.}" status --porcelain 2>/dev/null | head -1)
printf 'agent-vm %s' "$(basename "${dir:-$PWD}")"
[ -n "$branch" ] && printf ' (%s%s)' "$branch" "${dirty:+*}"
[ -n "$model" ] && printf ' · %s' "$model"
