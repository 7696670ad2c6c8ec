fn main() {
    println!("push-manager");
}
