//! `ovbd`: the binary is the command line in `ovbd::cli`.

fn main() {
    ovbd::cli::main()
}
