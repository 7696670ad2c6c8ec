//! `--config FILE` and `--print-config` for the roles that take them (`serve`, `node`), so a
//! deployment can keep its settings in a file instead of a long command line. A role reads the
//! TOML table named after it (`[serve]`, `[node]`) and ignores the other roles' tables; the keys
//! are the role's long flags without `--`. The clap definitions stay the only list of flags: a
//! key is looked up among the role's arguments, checked with that flag's own value parser (so an
//! error names the file and the key), and becomes the `--key=value` argument it stands for,
//! placed before the command line's. A flag the command line gives is not taken from the file,
//! so the command line wins. `--print-config` turns the parsed arguments back into that table.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::builder::{Resettable, ValueParser};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, CommandFactory, FromArgMatches};
use toml::Value;

use super::Cli;
use crate::secret::Secret;

/// `--config` and `--print-config`, on every role that reads a config file.
#[derive(Args, Debug, Clone)]
pub struct ConfigFileArgs {
    /// TOML file holding this subcommand's flags in a table named after it ([serve], [node]),
    /// long names without -- as keys, e.g. `routine-size = 4`; flags given here win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (defaults, then the --config file, then flags) as that
    /// TOML table, secrets masked, and exit without starting anything.
    #[arg(long)]
    pub print_config: bool,
}

/// The argument ids of [`ConfigFileArgs`], which a file cannot set.
const CONFIG: &str = "config";
const PRINT_CONFIG: &str = "print_config";

/// What the command line asks for.
// Made once per process: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Invocation {
    Run(Cli),
    /// `--print-config`: print this, start nothing.
    Print(String),
}

/// Parses the process's arguments, with the values of the `--config` file (if any) before them.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, clap::Error> {
    let cmd = command();
    let args = with_file_values(&cmd, args.into_iter().collect())?;
    let matches = cmd.clone().try_get_matches_from(args)?;
    if let Some((name, sub)) = matches.subcommand() {
        if matches!(sub.try_get_one::<bool>(PRINT_CONFIG), Ok(Some(true))) {
            let role = cmd.find_subcommand(name).expect("the subcommand just parsed");
            return Ok(Invocation::Print(render(role, sub)));
        }
    }
    Cli::from_arg_matches(&matches).map(Invocation::Run)
}

/// `Cli`'s command, in which a role's switches also take `=true` or `=false` (so the command
/// line can turn off a switch its file turns on) and a flag given twice keeps the last value.
fn command() -> Command {
    let mut cmd = Cli::command();
    let roles: Vec<String> = roles(&cmd).map(|role| role.get_name().to_string()).collect();
    for role in roles {
        cmd = cmd.mut_subcommand(role, |sub| {
            sub.args_override_self(true).mut_args(|arg| match kind(&arg) {
                Kind::Switch => {
                    arg.num_args(0..=1).require_equals(true).default_missing_value("true").value_name("true|false")
                }
                _ => arg,
            })
        });
    }
    cmd
}

/// The subcommands that take `--config`.
fn roles(cmd: &Command) -> impl Iterator<Item = &Command> {
    cmd.get_subcommands().filter(|sub| sub.get_arguments().any(|arg| arg.get_id() == CONFIG))
}

/// `args` with the `--config` file's values inserted right after the role's name.
fn with_file_values(cmd: &Command, args: Vec<OsString>) -> Result<Vec<OsString>, clap::Error> {
    // A first, forgiving look for the role, the file, and which flags the command line sets;
    // errors are left to the real parse.
    let Ok(first) = cmd.clone().ignore_errors(true).try_get_matches_from(args.iter().cloned()) else {
        return Ok(args);
    };
    let Some((name, given)) = first.subcommand() else { return Ok(args) };
    let Ok(Some(path)) = given.try_get_one::<PathBuf>(CONFIG) else { return Ok(args) };
    let role = cmd.find_subcommand(name).expect("the subcommand just parsed");
    let values =
        file_values(cmd, role, path, given).map_err(|e| clap::Error::raw(ErrorKind::InvalidValue, e + "\n"))?;
    let at = args.iter().skip(1).position(|a| a == name).map_or(args.len(), |i| i + 2);
    let mut merged = args;
    merged.splice(at..at, values);
    Ok(merged)
}

/// The `--key=value` arguments the file at `path` holds for `role`, leaving out the flags the
/// command line already sets (`given`).
fn file_values(cmd: &Command, role: &Command, path: &Path, given: &ArgMatches) -> Result<Vec<OsString>, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the config file {file}: {e}"))?;
    let document: toml::Table =
        toml::from_str(&text).map_err(|e| format!("the config file {file} is not valid TOML: {e}"))?;
    let role_names: Vec<&str> = roles(cmd).map(Command::get_name).collect();
    let tables = role_names.iter().map(|r| format!("[{r}]")).collect::<Vec<_>>().join(", ");
    for (name, value) in &document {
        if !value.is_table() {
            return Err(format!("{file}: `{name}` is outside a table; flags go in the table of their role: {tables}"));
        }
        if !role_names.contains(&name.as_str()) {
            let hint =
                nearest(name, role_names.iter().copied()).map_or(String::new(), |n| format!(" (did you mean [{n}]?)"));
            return Err(format!("{file}: unknown table [{name}]{hint}; the tables are {tables}"));
        }
    }
    let Some(Value::Table(table)) = document.get(role.get_name()) else { return Ok(Vec::new()) };
    let section = format!("{file}: [{}]", role.get_name());
    let mut values = Vec::new();
    for (key, value) in table {
        let Some(arg) = settable(role).find(|arg| arg.get_long() == Some(key.as_str())) else {
            return Err(format!("{section}: {}", unknown_key(cmd, role, key)));
        };
        let raws = raw_values(arg, value)
            .map_err(|expected| format!("{section} {key} = {value}: expected {expected}, as --{key} takes"))?;
        for raw in &raws {
            check(arg, raw).map_err(|why| format!("{section} {key} = {value}: {why}"))?;
        }
        if given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            continue;
        }
        values.extend(raws.iter().map(|raw| OsString::from(format!("--{key}={raw}"))));
    }
    Ok(values)
}

/// Why `key` names no flag of `role`, and which one it likely meant.
fn unknown_key(cmd: &Command, role: &Command, key: &str) -> String {
    if role.get_arguments().any(|arg| arg.get_long() == Some(key)) {
        return format!("`{key}` cannot be set in a config file");
    }
    if let Some(other) = roles(cmd).find(|r| settable(r).any(|arg| arg.get_long() == Some(key))) {
        return format!(
            "`{key}` is a flag of {}, not of {}: put it in [{}]",
            other.get_name(),
            role.get_name(),
            other.get_name()
        );
    }
    match nearest(key, settable(role).filter_map(Arg::get_long)) {
        Some(near) => format!("unknown key `{key}`; did you mean `{near}`?"),
        None => format!(
            "unknown key `{key}`; the keys are the long flags of `push-manager {} --help`, without --",
            role.get_name()
        ),
    }
}

/// The candidate fewest edits away from `word`, if it is close enough to be a likely typo.
fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let (distance, near) = candidates.map(|c| (strsim::levenshtein(word, c), c)).min()?;
    (distance <= (word.chars().count() / 3).max(3)).then_some(near)
}

/// How a flag takes its value, and so which TOML types stand for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Given or not (`--no-watch`): a boolean.
    Switch,
    /// Given any number of times (`--allowed-origins`): an array, or one value.
    List,
    /// One value (`--routine-size 4`): a string or a number.
    Value,
}

fn kind(arg: &Arg) -> Kind {
    match arg.get_action() {
        ArgAction::SetTrue => Kind::Switch,
        ArgAction::Append => Kind::List,
        _ => Kind::Value,
    }
}

/// The flags a file may set: every long flag that takes a value or is a switch, except
/// `--config` and `--print-config`.
fn settable(role: &Command) -> impl Iterator<Item = &Arg> {
    role.get_arguments().filter(|arg| {
        arg.get_long().is_some()
            && ![CONFIG, PRINT_CONFIG].contains(&arg.get_id().as_str())
            && matches!(arg.get_action(), ArgAction::Set | ArgAction::Append | ArgAction::SetTrue)
    })
}

/// A file's value as the flag's command-line values; the error says what was expected.
fn raw_values(arg: &Arg, value: &Value) -> Result<Vec<String>, &'static str> {
    match (kind(arg), value) {
        (Kind::Switch, Value::Boolean(b)) => Ok(vec![b.to_string()]),
        (Kind::Switch, _) => Err("true or false"),
        (Kind::List, Value::Array(items)) => {
            items.iter().map(scalar).collect::<Option<_>>().ok_or("an array of strings or numbers")
        }
        (Kind::List, v) => scalar(v).map(|s| vec![s]).ok_or("a string, a number or an array of them"),
        (Kind::Value, v) => scalar(v).map(|s| vec![s]).ok_or("a string or a number"),
    }
}

fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Integer(n) => Some(n.to_string()),
        Value::Float(x) => Some(x.to_string()),
        _ => None,
    }
}

/// Runs the flag's own value parser on `raw`; the error is that parser's reason.
fn check(arg: &Arg, raw: &str) -> Result<(), String> {
    let long = arg.get_long().expect("settable flags are long");
    // The flag alone: what it requires or conflicts with is the whole command line's business.
    let alone = arg
        .clone()
        .required(false)
        .requires(Resettable::Reset)
        .conflicts_with(Resettable::Reset)
        .allow_hyphen_values(true);
    let parse = Command::new("check").no_binary_name(true).arg(alone).try_get_matches_from([format!("--{long}={raw}")]);
    let Err(e) = parse else { return Ok(()) };
    if let Some(reason) = std::error::Error::source(&e) {
        return Err(format!("{reason} (--{long}: {})", help_line(arg)));
    }
    // clap's own message, without its "error: " and what follows the blank line.
    let rendered = e.render().to_string();
    let message = rendered.split("\n\n").next().unwrap_or_default();
    Err(message.trim_start_matches("error: ").split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The first sentence of a flag's help: what its value means.
fn help_line(arg: &Arg) -> String {
    let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
    help.split_inclusive(". ").next().unwrap_or_default().trim().to_string()
}

/// `role`'s effective flags as the table a `--config` file holds for it: a flag with no value
/// and no default is a comment, and so is a secret's value (see [`is_secret`]).
fn render(role: &Command, matches: &ArgMatches) -> String {
    let name = role.get_name();
    let mut out = format!("# push-manager {name}: defaults, then the --config file, then flags\n[{name}]\n");
    for arg in settable(role) {
        let key = arg.get_long().expect("settable flags are long");
        let raws: Vec<String> = matches
            .get_raw(arg.get_id().as_str())
            .into_iter()
            .flatten()
            .map(|raw| raw.to_string_lossy().into_owned())
            .collect();
        let line = match (kind(arg), raws.last()) {
            (_, Some(_)) if is_secret(arg) => format!("# {key} = \"****\" (a secret: not printed)"),
            (Kind::Switch, raw) => format!("{key} = {}", raw.map_or("false", String::as_str)),
            (Kind::List, _) => format!("{key} = {}", Value::Array(raws.iter().map(|raw| toml_scalar(raw)).collect())),
            (Kind::Value, Some(raw)) => format!("{key} = {}", toml_scalar(raw)),
            (Kind::Value, None) => format!("# {key} is not set"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A flag whose value is itself a secret (a password or token, not the path of a file holding
/// one) parses into a [`Secret`]; its value is masked here as everywhere else.
fn is_secret(arg: &Arg) -> bool {
    let secret: ValueParser = clap::value_parser!(Secret).into();
    arg.get_value_parser().type_id() == secret.type_id()
}

/// An integer prints bare; anything else, an integer spelled another way (`007`) included, as a
/// string, which reads back as the same command-line value.
fn toml_scalar(raw: &str) -> Value {
    match raw.parse::<i64>() {
        Ok(n) if n.to_string() == raw => Value::Integer(n),
        _ => Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role() -> Command {
        Command::new("serve")
            .arg(Arg::new(CONFIG).long("config"))
            .arg(
                Arg::new("routine_size")
                    .long("routine-size")
                    .value_parser(clap::value_parser!(usize))
                    .default_value("4"),
            )
            .arg(Arg::new("password").long("password").value_parser(clap::value_parser!(Secret)))
            .arg(Arg::new("no_watch").long("no-watch").action(ArgAction::SetTrue))
            .arg(Arg::new("origins").long("origins").action(ArgAction::Append))
    }

    #[test]
    fn typos_get_the_nearest_key_and_nonsense_gets_none() {
        let keys = ["routine-size", "queue-size", "poll-interval", "no-watch"];
        assert_eq!(nearest("rotine-size", keys.into_iter()), Some("routine-size"));
        assert_eq!(nearest("routine_size", keys.into_iter()), Some("routine-size"));
        assert_eq!(nearest("nowatch", keys.into_iter()), Some("no-watch"));
        assert_eq!(nearest("frobnicate-everything", keys.into_iter()), None);
    }

    #[test]
    fn each_kind_of_flag_takes_its_toml_types() {
        let role = role();
        let arg = |id: &str| role.get_arguments().find(|a| a.get_id() == id).unwrap().clone();
        assert_eq!(raw_values(&arg("routine_size"), &Value::Integer(8)), Ok(vec!["8".into()]));
        assert_eq!(raw_values(&arg("routine_size"), &Value::String("8".into())), Ok(vec!["8".into()]));
        assert!(raw_values(&arg("routine_size"), &Value::Boolean(true)).unwrap_err().contains("string or a number"));
        assert_eq!(raw_values(&arg("no_watch"), &Value::Boolean(false)), Ok(vec!["false".into()]));
        assert_eq!(raw_values(&arg("no_watch"), &Value::String("yes".into())), Err("true or false"));
        let two = Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
        assert_eq!(raw_values(&arg("origins"), &two), Ok(vec!["a".into(), "b".into()]));
        assert!(raw_values(&arg("routine_size"), &two).is_err());
        assert!(check(&arg("routine_size"), "four").unwrap_err().contains("invalid digit"));
    }

    #[test]
    fn a_secret_is_masked_and_integers_print_bare() {
        let role = role();
        let matches =
            role.clone().try_get_matches_from(["serve", "--password", "hunter2", "--origins", "007"]).unwrap();
        let text = render(&role, &matches);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("# password = \"****\" (a secret: not printed)\n"), "{text}");
        assert!(text.contains("routine-size = 4\n"), "{text}");
        assert!(text.contains("no-watch = false\n"), "{text}");
        assert!(text.contains("origins = [\"007\"]\n"), "{text}");
        let unset = render(&role, &role.clone().try_get_matches_from(["serve"]).unwrap());
        assert!(unset.contains("# password is not set\n"), "{unset}");
    }
}
