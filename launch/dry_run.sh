# Sourced by launch/common.sh and launch/gpu/common.sh: the --dry-run flag and run().
# SETTINGS_FILE names the file that lists the settings, for the unknown-argument message.

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "unknown argument $arg (the only flag is --dry-run; settings are environment variables, see $SETTINGS_FILE)" >&2; exit 2 ;;
  esac
done

# run CMD...: runs it, or prints it with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
